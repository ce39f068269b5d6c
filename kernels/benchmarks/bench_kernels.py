"""Benchmark: each kernel of ragft_kernels against its torch reference, forward + backward.

Per kernel: milliseconds per forward + backward (median), the bytes autograd keeps for the backward pass
(counted through saved-tensor hooks, so the same figure on any device), and on CUDA the peak memory
allocated during the call over what was allocated before. Prints a table with the ratios kernel /
reference and, with --csv, writes the rows.

Which path runs is the kernels' own choice: Triton on CUDA, the torch path on CPU tensors (the Triton
interpreter is for tests, never for timing).

    python kernels/benchmarks/bench_kernels.py [--device cuda] [--dtype bf16] [--shapes smollm2|llama1b|tiny] [--reps 5]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import torch

from ragft_kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_reference
from ragft_kernels.rms_norm import rms_norm, rms_norm_reference
from ragft_kernels.rope import rope, rope_reference
from ragft_kernels.swiglu import swiglu, swiglu_reference

# tokens per micro-batch, hidden, intermediate, heads, head dim, vocabulary
SHAPES = {
    "tiny": dict(tokens=64, hidden=32, inter=96, heads=4, head_dim=8, vocab=300),
    "smollm2": dict(tokens=8 * 256, hidden=576, inter=1536, heads=9, head_dim=64, vocab=49152),
    "llama1b": dict(tokens=8 * 1024, hidden=2048, inter=8192, heads=32, head_dim=64, vocab=128256),
}


def cases(shape: dict, dtype: torch.dtype, device: str):
    """name -> (kernel, reference, inputs factory); inputs that need gradients have requires_grad set."""
    t, h, i, heads, d, v = (shape[k] for k in ("tokens", "hidden", "inter", "heads", "head_dim", "vocab"))
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, grad=True, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    def linear_ce_inputs():
        targets = torch.randint(0, v, (t,), generator=g).to(device)
        return rand(t, h), rand(v, h, scale=0.02), targets

    def rope_inputs():
        seq = min(t, 1024)
        batch = max(1, t // seq)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.arange(seq).float()[:, None] * inv
        emb = torch.cat((freqs, freqs), -1)[None]
        q = rand(batch, seq, heads, d).detach().transpose(1, 2).requires_grad_()
        return q, rand(batch, max(1, heads // 4), seq, d), emb.cos().to(device, dtype), emb.sin().to(device, dtype)

    return {
        "linear_ce": (linear_cross_entropy, linear_cross_entropy_reference, linear_ce_inputs),
        "rms_norm": (lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_reference(x, w, 1e-6),
                     lambda: (rand(t, h), rand(h))),
        "swiglu": (swiglu, swiglu_reference, lambda: (rand(t, i), rand(t, i))),
        "rope": (rope, rope_reference, rope_inputs),
    }


def saved_bytes(fn, inputs) -> int:
    """Bytes of distinct storages autograd saves for the backward pass of fn(*inputs)."""
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*inputs)
    del out
    leaves = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
    return sum(n for ptr, n in seen.items() if ptr not in leaves)  # inputs exist anyway: count what is added


def fwd_bwd(fn, inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, make_inputs, device: str, reps: int) -> dict:
    inputs = make_inputs()
    fwd_bwd(fn, inputs)  # warm-up (and Triton's compilation)
    times = []
    for _ in range(reps):
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None
        sync(device)
        start = time.perf_counter()
        fwd_bwd(fn, inputs)
        sync(device)
        times.append(time.perf_counter() - start)
    row = {"ms": statistics.median(times) * 1000, "saved_mib": saved_bytes(fn, inputs) / 2**20, "peak_mib": None}
    if device.startswith("cuda"):
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, inputs)
        sync(device)
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def run(shapes: str, dtype: torch.dtype, device: str, reps: int) -> list[dict]:
    """One row per kernel: its figures and the reference's."""
    rows = []
    for name, (kernel, reference, make_inputs) in cases(SHAPES[shapes], dtype, device).items():
        k, r = measure(kernel, make_inputs, device, reps), measure(reference, make_inputs, device, reps)
        rows.append({"kernel": name, "shapes": shapes, "dtype": str(dtype).removeprefix("torch."), "device": device,
                     **{f"ragft_{key}": value for key, value in k.items()},
                     **{f"torch_{key}": value for key, value in r.items()}})
    return rows


def table(rows: list[dict]) -> str:
    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else "-"

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| kernel | shapes | dtype | device | ms ragft / torch | ratio | saved MiB ragft / torch | ratio "
             "| peak MiB ragft / torch | ratio |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['shapes']} | {r['dtype']} | {r['device']} | {r['ragft_ms']:.2f} / {r['torch_ms']:.2f} "
            f"| {ratio(r['ragft_ms'], r['torch_ms'])} | {r['ragft_saved_mib']:.1f} / {r['torch_saved_mib']:.1f} "
            f"| {ratio(r['ragft_saved_mib'], r['torch_saved_mib'])} | {fmt(r['ragft_peak_mib'], '.1f')} / "
            f"{fmt(r['torch_peak_mib'], '.1f')} | {ratio(r['ragft_peak_mib'], r['torch_peak_mib'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--shapes", choices=list(SHAPES), default="smollm2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.shapes, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.device, args.reps)
    print(table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
