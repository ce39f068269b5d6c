"""Peak memory and step time of one training step with model.kernels=ragft vs none, on this machine.

For each of model.kernels in (none, ragft) and data.train_on_prompt in (false, true) a fresh child process
(so one run's freed-but-kept heap never counts in the next one's peak) builds the job from the config
(default: SmolLM2-135M, LoRA, ZeRO-2 through DeepSpeed, micro batch 8 x 256 tokens, the sample data), and:

1. runs `--steps` DeepSpeed steps (forward, backward, optimizer) on the first batch, recording the peak
   resident memory over them (Linux VmHWM, reset before the first; large allocations go straight to
   mmap so freed memory leaves the RSS) and the median time of the steps after the first;
2. restores the initial trainable weights and computes that batch's loss and gradients on the plain
   model (no DeepSpeed), to compare the two kernel settings.

Then it prints one table: peak RSS, the step's extra memory over the RSS before it, step time, and the
ratios ragft / none, plus the largest loss and gradient differences. Memory does not depend on other
processes; step time on a shared CPU does.

    python launch/memory_kernels.py [--steps 3] [--threads 2] [overrides, e.g. model=tiny method=full]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memory_train import first_batch, reset_peak, rss_gib  # noqa: E402  (launch/, this script's folder)

DEFAULTS = ["model=smollm2", "method=lora", "strategy=zero2", "train.micro_batch_size=8",
            "train.global_batch_size=8", "data.max_seq_len=256"]


def child(out: Path, steps: int, overrides: list[str]) -> None:
    """One setting: writes out/result.json and out/grads.pt."""
    import deepspeed
    import torch

    from ragft.model.build import load_model
    from ragft.train.deepspeed_config import render, warmup_cosine
    from ragft.train.loop import cpu_autocast
    from ragft.train.loss import causal_lm_loss

    spec, tokenizer, batch, labelled = first_batch(overrides, out / "run")

    torch.manual_seed(spec.seed)  # the same LoRA init in every child
    model = load_model(spec.base_model_path, spec.model, spec.method, torch.float32, use_cuda=False)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=render(spec), lr_scheduler=warmup_cosine(10, 0.0, 0.1))[0]
    engine.train()
    times = []
    reset_peak()
    before = rss_gib()[0]
    for step in range(steps):
        start = time.perf_counter()
        with cpu_autocast(spec):
            loss = causal_lm_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        loss = None
        if step >= 1:  # the first step is a warm-up for the clock (its memory counts)
            times.append(time.perf_counter() - start)
    peak = rss_gib()[1]

    # the loss and gradients of the first batch from the initial weights, outside DeepSpeed, to compare settings
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial:
                param.copy_(initial[name])
    model.zero_grad(set_to_none=True)
    with cpu_autocast(spec):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    torch.save({n: p.grad for n, p in model.named_parameters() if n in initial}, out / "grads.pt")
    first_loss = loss.item()
    result = dict(kernels=spec.model.kernels, train_on_prompt=spec.data.train_on_prompt, model=spec.model.name,
                  method=spec.method.name, precision=spec.precision, batch=list(batch["input_ids"].shape),
                  labelled=labelled, vocab=len(tokenizer), loss=first_loss, peak_gib=peak, before_gib=before,
                  step_s=statistics.median(times), threads=torch.get_num_threads())
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="DeepSpeed steps per setting; the first is a warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        child(Path(args.child), args.steps, overrides)
        return

    import torch

    root = Path(tempfile.mkdtemp(prefix="ragft-memory-kernels-"))
    results = {}
    for on_prompt in ("false", "true"):
        for kernels in ("none", "ragft"):
            out = root / f"{kernels}-{on_prompt}"
            out.mkdir()
            cmd = [sys.executable, __file__, f"--child={out}", f"--steps={args.steps}", f"--threads={args.threads}",
                   *DEFAULTS, *overrides, f"model.kernels={kernels}", f"data.train_on_prompt={on_prompt}"]
            # Large allocations straight from mmap, so freed memory leaves the RSS at once and the peak RSS is
            # the peak of live memory, not of glibc's retained heap.
            env = dict(os.environ, TRITON_INTERPRET="0", MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{kernels} train_on_prompt={on_prompt} failed:\n{proc.stderr[-4000:]}")
            results[kernels, on_prompt] = json.loads((out / "result.json").read_text())
            results[kernels, on_prompt]["grads"] = torch.load(out / "grads.pt")
            r = results[kernels, on_prompt]
            print(f"done: kernels={kernels} train_on_prompt={on_prompt}: peak {r['peak_gib']:.2f} GiB, "
                  f"step {r['step_s']:.2f} s", flush=True)

    r0 = results["none", "false"]
    print(f"\n{r0['model']} {r0['method']} ZeRO-2, precision {r0['precision']}, batch {r0['batch'][0]} x "
          f"{r0['batch'][1]}, vocabulary {r0['vocab']}, {r0['threads']} threads; peak over {args.steps} steps, "
          f"step extra = peak - RSS before them, time: median of the {args.steps - 1} after the first\n")
    header = ("train_on_prompt", "labelled", "kernels", "peak RSS", "step extra", "step time", "loss")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for on_prompt in ("false", "true"):
        none, ragft = results["none", on_prompt], results["ragft", on_prompt]
        for r in (none, ragft):
            print(f"| {on_prompt} | {r['labelled']} | {r['kernels']} | {r['peak_gib']:.2f} GiB | "
                  f"{r['peak_gib'] - r['before_gib']:.2f} GiB | {r['step_s']:.2f} s | {r['loss']:.5f} |")
        extra = lambda r: r["peak_gib"] - r["before_gib"]  # noqa: E731
        grad_diff = max(float((ragft["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                        for n, g in none["grads"].items())
        print(f"| {on_prompt} | | ragft / none | {ragft['peak_gib'] / none['peak_gib']:.3f} | "
              f"{extra(ragft) / max(extra(none), 1e-9):.3f} | {ragft['step_s'] / none['step_s']:.3f} | "
              f"loss diff {abs(ragft['loss'] - none['loss']):.2e}, max grad diff {grad_diff:.2e} of the "
              f"tensor's max |")
    print(f"\nchildren's files: {root}")


if __name__ == "__main__":
    main()
