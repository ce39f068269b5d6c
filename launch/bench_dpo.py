"""objective=dpo on SmolLM2: does it learn to prefer the value in the document, and what does a DPO step cost
next to an SFT step on the same rows?

1. `ragft index` on the shipped handbook (sentence-sized chunks, as the demo's SmolLM2 recipe), then
   `ragft data raft raft.pairs=true raft.counterfactual_fraction=0`: per training question a RAG prompt holding the
   gold chunk, chosen = the value in it, rejected = another question's value for the same attribute.
2. Accuracy: `ragft train model=smollm2 method=lora strategy=zero2 cluster.num_workers=2 objective=dpo` for
   `--steps` steps on those pairs; the held-out reward accuracy is `eval_reward_accuracy` in its result.json.
3. Cost (`--bench-steps` each, one after the other in this run): the same LoRA/ZeRO-2/2-worker job with
   objective=dpo on the pairs and with objective=sft on the same rows as chat (prompt + chosen reply). Step time
   is the mean over the middle third of the steps (after start-up, before the final evaluation); memory is the peak resident memory of a worker
   (CPU) or its peak accelerator memory. Both unpacked (one example or pair per row), so a step sees the same
   rows. Prints both and DPO / SFT, and writes `<out>/bench_dpo.json`.

    python launch/bench_dpo.py [--out runs/bench_dpo] [--steps 30] [--bench-steps 6] [--questions 400]
                               [--skip-accuracy] [--skip-bench] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

JOB = ["model=smollm2", "method=lora", "strategy=zero2", "cluster.num_workers=2", "train.micro_batch_size=4",
       "train.global_batch_size=8", "data=jsonl", "data.max_seq_len=384", "train.lr=5e-4", "objective.dpo.beta=0.1"]


def ragft(*args: str) -> None:
    print("$ ragft " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "ragft", *args], check=True)


def make_pairs(out: Path, questions: int) -> Path:
    """The RAFT preference pairs: gold chunk in the prompt, chosen its value, rejected a rival line's value."""
    pairs = out / "pairs.jsonl"
    if pairs.is_file():
        return pairs
    ragft("index", f"out_dir={out / 'index_run'}", f"index.path={out / 'index'}", "index.chunk_tokens=32",
          "index.chunk_overlap=8")
    ragft("data", "raft", f"out_dir={out / 'raft_run'}", f"index.path={out / 'index'}", f"raft.out_path={pairs}",
          "raft.pairs=true", "raft.k=2", f"raft.max_questions={questions}", "raft.counterfactual_fraction=0",
          "rag.k=2")
    return pairs


def as_chat(pairs: Path) -> Path:
    """The same rows for SFT: the prompt's messages and the chosen reply as the assistant turn."""
    chat = pairs.with_name("chosen_chat.jsonl")
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    chat.write_text("".join(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]})
                            + "\n" for r in rows))
    return chat


def train(out_dir: Path, *overrides: str) -> dict:
    ragft("train", f"out_dir={out_dir}", f"registry.path={out_dir.parent / 'registry.jsonl'}", *JOB, *overrides)
    return json.loads((out_dir / "result.json").read_text())


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def accuracy_run(args, pairs: Path) -> dict:
    out_dir = args.out / "dpo_accuracy"
    result = train(out_dir, "objective=dpo", f"data.train_path={pairs}", "data.eval_fraction=0.1",
                   f"train.max_steps={args.steps}", "train.log_every=5", f"train.eval_every={args.steps // 3}",
                   "train.eval_max_batches=5", f"train.save_every={args.steps}", f"strategy.precision={args.precision}")
    every = args.steps // 3  # a log line repeats the last evaluation until the next one: keep evaluated steps
    evals = [{k: m[k] for k in ("step", "eval_loss", "eval_reward_accuracy", "eval_reward_margin")}
             for m in history(out_dir) if "eval_reward_accuracy" in m and (m["step"] % every == 0 or
                                                                           m["step"] == args.steps)]
    return {"result": str(out_dir / "result.json"), "evals": evals,
            "eval_reward_accuracy": result["metrics"]["eval_reward_accuracy"],
            "train_rows": result["data"]["train_rows"], "eval_rows": result["data"]["eval_rows"]}


def cost_run(args, objective: str, data: Path) -> dict:
    """Step time of the middle third of the steps (after start-up, before the final evaluation, which the last
    log window would include), peak memory at the end. Unpacked for SFT too: one example per row, as a pair."""
    out_dir = args.out / f"cost_{objective}"
    third = args.bench_steps // 3
    train(out_dir, f"objective={objective}", f"data.train_path={data}", "data.eval_fraction=0.05",
          "data.packing=false", f"train.max_steps={3 * third}", f"train.log_every={third}",
          "train.eval_every=100000", "train.eval_max_batches=1", "train.save_every=100000",
          f"strategy.precision={args.precision}")
    logged = history(out_dir)
    middle, last = logged[1], logged[-1]
    return {"step_time_s": middle["step_time_s"], "tokens_per_s": middle["tokens_per_s"], "mem_gb": last["mem_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dpo"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bench-steps", type=int, default=6)
    parser.add_argument("--questions", type=int, default=400)
    parser.add_argument("--precision", default="fp32", help="pinned: CPUs differ in bf16 speed (docs FACTS)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.out, args.questions)
    saved = args.out / "bench_dpo.json"
    report: dict = {**(json.loads(saved.read_text()) if saved.is_file() else {}), "pairs": str(pairs)}  # keep parts skipped
    if not args.skip_accuracy:
        report["accuracy"] = accuracy_run(args, pairs)
        print(f"held-out reward accuracy after {args.steps} steps: {report['accuracy']['eval_reward_accuracy']:.3f} "
              f"({report['accuracy']['eval_rows']} eval pairs); evaluations: {report['accuracy']['evals']}",
              flush=True)
    if not args.skip_bench:
        dpo, sft = cost_run(args, "dpo", pairs), cost_run(args, "sft", as_chat(pairs))
        report["cost"] = {"dpo": dpo, "sft": sft, "step_time_ratio": dpo["step_time_s"] / sft["step_time_s"],
                          "mem_ratio": dpo["mem_gb"] / sft["mem_gb"]}
        print(f"{'':6} {'s/step':>8} {'peak GiB':>9}\n{'sft':6} {sft['step_time_s']:8.2f} {sft['mem_gb']:9.2f}\n"
              f"{'dpo':6} {dpo['step_time_s']:8.2f} {dpo['mem_gb']:9.2f}\n{'ratio':6} "
              f"{report['cost']['step_time_ratio']:8.2f} {report['cost']['mem_ratio']:9.2f}", flush=True)
    saved.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
