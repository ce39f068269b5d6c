"""One script that measures ragft on a GPU machine, in about 8 minutes, and writes one JSON and one Markdown table.

For a lent GPU box with torch, transformers, peft, triton and a DeepSpeed wheel, but no Ray and no package
index: every training run goes through the one-process loop `ragft.train.local` in a child process in which
`import ray` fails, so nothing here can lean on Ray. Sections, each skipped with its reason when it cannot
run (missing package, no CUDA, time budget spent):

1. environment: versions, the device, which optional packages are present;
2. kernels: each ragft kernel's forward + backward time, saved-for-backward bytes and peak memory against
   its torch reference (kernels/benchmarks/bench_kernels.py), at Llama-3.2-1B shapes;
3. training: tokens/s, MFU and peak memory of full fine-tuning and LoRA, bf16, of a random-init
   Llama-3.2-1B-shaped model (1.2B parameters, vocabulary 128,256, tied embeddings) with model.kernels
   none, ragft and liger (when Liger-Kernel is installed) under DeepSpeed ZeRO-2, and the same with
   kernels none and ragft under strategy=fsdp2 (PyTorch FSDP2, run with `import deepspeed` failing too);
   every position labelled (the LM head's worst case); figures from the last logged window, so start-up
   and the first steps are left out;
4. QLoRA: a short smoke run (needs bitsandbytes);
5. vLLM: generation tokens/s of the same random-init model when `import vllm` works.

A training run is stopped once its last metrics line is written: the final checkpoint the loop would write
next (tens of GB for a full fine-tune's optimizer state) is not part of the measurement.

    python launch/gpu_check.py --out results/             # on the GPU machine
    python launch/gpu_check.py --dry-run --out /tmp/gc    # anywhere: tiny shapes on CPU, under ~2 minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
KERNELS_SRC = REPO / "kernels" / "src"
# ragft and ragft_kernels from this checkout (they may not be installed); bench_kernels beside the kernels
sys.path[:0] = [str(REPO), str(KERNELS_SRC), str(REPO / "kernels" / "benchmarks")]

# Llama-3.2-1B's shape; the dry run's is tiny. vocab >= the sample tokenizer's 2,048 ids. Head size 64 in both:
# vLLM's CPU attention takes no smaller one.
MODEL_SHAPES = {
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "dry": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=True),
}
# ragft.train.local with the modules named in argv[1] (comma-separated) made unimportable
RUN_BLOCKING = ("import runpy, sys; sys.modules.update(dict.fromkeys(filter(None, sys.argv[1].split(',')))); "
                "sys.argv = ['ragft.train.local', *sys.argv[2:]]; "
                "runpy.run_module('ragft.train.local', run_name='__main__', alter_sys=True)")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    for name in ("transformers", "peft", "deepspeed", "triton", "liger_kernel", "bitsandbytes", "vllm", "ray"):
        if has(name):
            try:
                env[name] = importlib.import_module(name).__version__ if name != "ray" else "installed (not used)"
            except Exception as err:  # present but broken: say so rather than stop
                env[name] = f"import fails: {type(err).__name__}: {str(err)[:120]}"
        else:
            env[name] = None
    return env


def build_model(folder: Path, shape: str, cache_dir: Path, device: str) -> Path:
    """A random-init Llama of `shape` with ragft's sample tokenizer, saved in bf16 as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ragft.model.tokenizer import cached_tokenizer
    from ragft.sample import sample_path

    if (folder / "config.json").exists():
        return folder
    corpus = [sample_path(name) for name in ("corpus.jsonl", "corpus_v2.jsonl", "train.jsonl")]
    tokenizer = AutoTokenizer.from_pretrained(cached_tokenizer(corpus, 2048, cache_dir))
    config = LlamaConfig(**MODEL_SHAPES[shape], max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_run(name: str, overrides: list[str], out: Path, env: dict, timeout: float, last_step: int,
              blocked: tuple[str, ...] = ("ray",)) -> dict:
    """One `ragft.train.local` run without Ray (nor any module of `blocked`); stopped once the metrics line of
    `last_step` is written."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    log = out / f"{name}.log"
    cmd = [sys.executable, "-c", RUN_BLOCKING, ",".join(blocked), f"out_dir={run_dir}", *overrides]
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        metrics: list[dict] = []
        while proc.poll() is None and time.monotonic() - start < timeout:
            metrics = read_metrics(run_dir)
            if metrics and metrics[-1].get("step") == last_step:
                break
            time.sleep(1)
        stopped = proc.poll() is None
        if stopped:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    metrics = read_metrics(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a 1B model fill a disk fast
    result = {"name": name, "seconds": round(time.monotonic() - start, 1), "log": str(log)}
    if not metrics or metrics[-1].get("step") != last_step:
        tail = log.read_text()[-1500:] if log.exists() else ""
        return {**result, "status": "failed" if not stopped else "timeout", "error": tail}
    last = metrics[-1]
    return {**result, "status": "ok", **{k: last.get(k) for k in ("loss", "tokens_per_s", "mfu", "mem_gb",
                                                                     "step_time_s", "model_tflops")},
            "losses": [m.get("loss") for m in metrics]}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return lines


def vllm_run(folder: Path, timeout: float, dry: bool) -> dict:
    """Generation tokens/s of vLLM on the random-init model, token-id prompts (no detokenising)."""
    code = f"""
import json, time
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model={str(folder)!r}, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.5,
              skip_tokenizer_init=True, max_model_len=2048)
    prompts = [{{"prompt_token_ids": [(7 * i + j) % 2000 + 10 for j in range(128)]}} for i in range({8 if dry else 128})]
    params = SamplingParams(max_tokens={16 if dry else 128}, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], params)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({{"prompts": len(prompts), "generated_tokens": tokens, "seconds": seconds,
                                  "tokens_per_s": tokens / seconds}}))
"""
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[7:])}
    output = proc.stdout + proc.stderr
    causes = list(dict.fromkeys(line.split("] ")[-1] for line in output.splitlines() if "Error: " in line))
    return {"status": "failed", "error": "\n".join(causes[:5]) + "\n...\n" + output[-800:]}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# ragft gpu_check{' (dry run: tiny shapes on CPU)' if report['dry_run'] else ''}", "",
             f"device: {env['device']}; torch {env['torch']}; " + ", ".join(
                 f"{k} {v}" for k, v in env.items() if k in ("transformers", "peft", "deepspeed", "triton",
                                                              "liger_kernel", "bitsandbytes", "vllm") and v)
             + f"; total {report['seconds']:.0f} s", ""]
    precision = "strategy.precision=auto" if report["dry_run"] else "bf16"
    lines += [f"## Training (ragft.train.local, {precision}, last logged window)", "",
              "| method | strategy | kernels | status | tokens/s | MFU | peak mem GB | step s | loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["training"]:
        def f(key, spec):
            return "-" if r.get(key) is None else format(r[key], spec)

        lines.append(f"| {r['method']} | {r['strategy']} | {r['kernels']} | {r['status']}{': ' + r['reason'] if r.get('reason') else ''} "
                     f"| {f('tokens_per_s', '.0f')} | {f('mfu', '.3f')} | {f('mem_gb', '.2f')} | "
                     f"{f('step_time_s', '.3f')} | {f('loss', '.4f')} |")
    lines += ["", "## Kernels vs torch reference (forward + backward)", ""]
    k = report["kernels"]
    if k.get("status") == "ok":
        from bench_kernels import table

        lines.append(table(k["rows"]))
    else:
        lines.append(f"{k.get('status')}: {k.get('reason', k.get('error', ''))}")
    for section, title in (("qlora", "QLoRA smoke run"), ("vllm", "vLLM generation")):
        r = report[section]
        lines += ["", f"## {title}", "", ", ".join(f"{key}: {value}" for key, value in r.items()
                                                  if key not in ("error", "log", "losses")) +
                  (f"\n\n```\n{r['error'][-600:]}\n```" if r.get("error") else "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for gpu_check.json, gpu_check.md and the run logs")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new sections after this (460 s; dry run 1200 s: a shared CPU is slow)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (12; dry run 4)")
    args = ap.parse_args()
    started = time.monotonic()
    budget = Budget(args.budget_s or (1200 if args.dry_run else 460))
    out = Path(args.out or f"runs/gpu_check-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.setdefault("RAGFT_CACHE", str(out / "cache")))

    import torch

    dry = args.dry_run
    cuda = torch.cuda.is_available() and not dry
    report = {"dry_run": dry, "environment": environment()}
    print(json.dumps(report["environment"]), flush=True)
    folder = build_model(out / ("model-dry" if dry else "model-llama1b"), "dry" if dry else "llama1b", cache,
                         "cuda" if cuda else "cpu")

    # kernels: in-process, the kernels' own device choice (Triton on CUDA, torch on CPU)
    try:
        from bench_kernels import run as bench

        os.environ["TRITON_INTERPRET"] = "0"
        rows = bench("tiny" if dry else "llama1b", torch.bfloat16, "cuda" if cuda else "cpu", 2 if dry else 10)
        report["kernels"] = {"status": "ok", "rows": rows}
    except Exception as err:
        report["kernels"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    print(f"kernels: {report['kernels']['status']}", flush=True)

    steps = args.steps or (4 if dry else 12)
    log_every = steps // 2
    env = dict(os.environ, TRITON_INTERPRET="0", RAGFT_CACHE=str(cache), WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(KERNELS_SRC), os.environ.get("PYTHONPATH")])))
    common = ["model=local", f"model.name={'dry' if dry else 'llama1b'}", f"model.source={folder}",
              "cluster.num_workers=1", f"cluster.use_gpu={str(cuda).lower()}",
              f"strategy.precision={'bf16' if cuda else 'auto'}", "data.train_on_prompt=true",
              f"data.max_seq_len={128 if dry else 1024}", f"train.micro_batch_size={2 if dry else 8}",
              f"train.global_batch_size={2 if dry else 8}", f"train.max_steps={steps}", f"train.log_every={log_every}",
              "train.eval_every=1000000", "train.save_every=1000000", "train.eval_max_batches=1", "train.lr=1e-4"]
    liger_reason = None if (has("liger_kernel") and cuda) else (
        "liger-kernel not installed" if not has("liger_kernel") else "no CUDA")
    report["training"] = []
    per_run = 40 if dry else 75  # what a run takes at least: below that left, it is not started
    run_timeout = 300 if dry else 3 * per_run
    # ZeRO-2 and FSDP2 side by side, kernels none first: what the budget cuts is the least compared
    rows = [(method, strategy, kernels) for kernels in ("none", "ragft", "liger") for method in ("full", "lora")
            for strategy in ("zero2", "fsdp2") if not (kernels == "liger" and strategy == "fsdp2")]
    for method, strategy, kernels in rows:
        row = {"method": method, "strategy": strategy, "kernels": kernels}
        if kernels == "liger" and liger_reason:
            row.update(status="skipped", reason=liger_reason)
        elif budget.left() < per_run:
            row.update(status="skipped", reason="time budget spent")
        else:
            # FSDP2 needs neither Ray nor DeepSpeed: its runs prove it by failing to import both
            blocked = ("ray", "deepspeed") if strategy == "fsdp2" else ("ray",)
            row.update(train_run(f"{method}-{strategy}-{kernels}",
                                 [*common, f"method={method}", f"strategy={strategy}", f"model.kernels={kernels}"],
                                 out, env, timeout=min(budget.left(), run_timeout), last_step=steps, blocked=blocked))
        report["training"].append(row)
        print(f"train {method} {strategy} {kernels}: {row['status']} "
              f"{row.get('tokens_per_s') or row.get('reason') or ''}", flush=True)

    if not (has("bitsandbytes") and cuda):
        report["qlora"] = {"status": "skipped", "reason": "needs CUDA and bitsandbytes"}
    elif budget.left() < per_run:
        report["qlora"] = {"status": "skipped", "reason": "time budget spent"}
    else:
        report["qlora"] = train_run("qlora", [*common, "method=qlora", "strategy=zero2", "train.max_steps=4",
                                              "train.log_every=4"],
                                    out, env, timeout=min(budget.left(), run_timeout), last_step=4)
    print(f"qlora: {report['qlora']['status']}", flush=True)

    if not has("vllm"):
        report["vllm"] = {"status": "skipped", "reason": "vllm not installed"}
    elif not cuda and not dry:
        report["vllm"] = {"status": "skipped", "reason": "no CUDA"}
    elif budget.left() < 60:
        report["vllm"] = {"status": "skipped", "reason": "time budget spent"}
    else:
        report["vllm"] = vllm_run(folder, timeout=min(budget.left(), 240), dry=dry)
    print(f"vllm: {report['vllm']['status']}", flush=True)

    report["seconds"] = time.monotonic() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
