"""Benchmark: `ragft serve` on the tiny model — per-request serving overhead, and tokens/s with and
without dynamic batching, both apps measured in the same run.

1. Overhead (batching on, concurrency 1, retrieval on): for each chat request, the client's
   end-to-end time minus the generation and retrieval times the server reports in its
   `Server-Timing` header. What is left is HTTP, the proxy, the ingress (auth, validation,
   prompt rendering, tokenization), the two handle hops and the batch queue. Prints p50 / p99.
2. Throughput: generated tokens/s at concurrency 1, 8 and 32 (closed loop: each client sends its
   next request when the last one returns; retrieval off, so this is generation), for the same
   app with `serve.batch.enabled=true` and `false` (batches of one, the same code path), and the
   ratio on / off.
3. With --vllm: bare vLLM offline (`LLM.generate` on the RAG prompts of 4., all at once) against
   `ragft serve` with serve.engine=vllm and with serve.engine=transformers answering the same prompts
   (as /v1/completions text, greedy) at each --concurrency (closed-loop clients): one table of
   generated tokens/s and the ratio vLLM engine / bare (goal: >= 0.8 at 32). vLLM runs in eager mode
   unless --compile.
4. With --engine: the engine alone (no Ray, no HTTP) on RAG prompts as `ragft serve` renders them (a sample
   question and two documents, ~300 tokens on SmolLM2's tokenizer), closed loop: tokens/s to answer
   --total requests at each concurrency (wall and per CPU-second), time to first token, and the longest
   pause inside a stream (a prefill stall).
5. With --adapter-load: `ragft serve` (--serve-engine transformers | vllm) on --model with a LoRA adapter A; closed-loop
   clients ask A while an admin loads a second adapter (POST /v1/adapters) --loads times, unloading it in between:
   the time each load takes (the server's `load_s`, all replicas) and the p50 / p99 latency of A's requests that
   ran before the first load and of those in flight during a load.

    python launch/bench_serve.py [--requests 60] [--seconds 20] [--max-tokens 32] [--python-proxy] [--model DIR]
    python launch/bench_serve.py --engine --model DIR --concurrency 8 32 --max-tokens 16 [--total 64]
    python launch/bench_serve.py --vllm --model DIR --concurrency 1 8 32 --max-tokens 16 [--total 64] [--compile]
    python launch/bench_serve.py --adapter-load --model DIR [--serve-engine vllm] [--concurrency 8] [--loads 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "In which harbour does the ferry Fousond spend the night?",
    "Which yard constructed the hull of the ferry Dreraerend?",
    "How many passengers is the Deikur licensed to carry?",
    "What year was the Dekraba commissioned?",
]


def prepare(root: Path) -> tuple[Path, Path]:
    """The tiny base model (random init) and the sample index, built once under `root`."""
    from ragft.config.compose import compose_config
    from ragft.config.schema import ModelConfig
    from ragft.index.spec import validate_index
    from ragft.index.update import update_index
    from ragft.model.build import materialize_tiny
    from ragft.sample import sample_path

    corpus = [sample_path("corpus.jsonl"), sample_path("train.jsonl")]
    base = materialize_tiny(ModelConfig(tokenizer_corpus=corpus), corpus, str(root / "cache"), 0, root / "base")
    index = root / "index"
    if not (index / "manifest.json").exists():
        update_index(validate_index(compose_config("index", [f"index.path={index}", f"out_dir={root / 'run'}"])))
    return base, index


def serve_spec(base: Path, index: Path, port: int, batching: bool, out: Path):
    from ragft.config.compose import compose_config
    from ragft.serve.spec import validate_serve

    return validate_serve(compose_config("serve", [
        f"checkpoint={base}", f"index.path={index}", f"serve.port={port}", f"out_dir={out}",
        f"serve.batch.enabled={str(batching).lower()}", "serve.retriever.max_replicas=1",
        "serve.generator.max_ongoing_requests=64", "serve.ingress.max_ongoing_requests=128"]))


def chat(client, url: str, question: str, max_tokens: int, rag: bool) -> tuple[float, dict, int]:
    body = {"model": "base", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "rag": {"enabled": rag}}
    started = time.perf_counter()
    response = client.post(f"{url}/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    timing = {}
    for part in response.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            timing[name] = float(dur) / 1000
    return elapsed, timing, response.json()["usage"]["completion_tokens"]


def overhead(url: str, n: int, max_tokens: int) -> dict:
    import httpx

    rows = []
    with httpx.Client(timeout=120) as client:
        for i in range(n + 5):
            elapsed, timing, _ = chat(client, url, QUESTIONS[i % len(QUESTIONS)], max_tokens, rag=True)
            if i >= 5:  # warm-up: first requests pay lazy imports and allocator growth
                rows.append((elapsed, timing["retrieval"], timing["generation"]))
    left = [(e - r - g) * 1000 for e, r, g in rows]
    return {"p50_ms": _pct(left, 50), "p99_ms": _pct(left, 99),
            "e2e_p50_ms": _pct([e * 1000 for e, _, _ in rows], 50),
            "retrieval_p50_ms": _pct([r * 1000 for _, r, _ in rows], 50),
            "generation_p50_ms": _pct([g * 1000 for _, _, g in rows], 50)}


def throughput(url: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    """Generated tokens/s over `seconds` with `concurrency` closed-loop clients."""
    import httpx

    tokens, lock, stop = [0], threading.Lock(), threading.Event()

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                _, _, n = chat(client, url, QUESTIONS[i % len(QUESTIONS)], max_tokens, rag=False)
                with lock:
                    tokens[0] += n

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(min(3.0, seconds / 4))  # ramp-up: let batches form before counting
    with lock:
        start_tokens, started = tokens[0], time.perf_counter()
    time.sleep(seconds)
    with lock:
        counted, elapsed = tokens[0] - start_tokens, time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join()
    return counted / elapsed


def rag_prompts(tokenizer) -> list[list[int]]:
    """One chat prompt per sample question, with retrieval's shape: the document that answers it and the next."""
    from ragft.config.schema import RagConfig
    from ragft.index.index import Hit
    from ragft.jsonl import read_rows
    from ragft.rag import prompt_ids
    from ragft.sample import sample_path

    docs = read_rows(sample_path("corpus.jsonl"))
    at = {d["id"]: i for i, d in enumerate(docs)}
    prompts = []
    for q in read_rows(sample_path("qa.jsonl")):
        i = at[q["doc_ids"][0]]
        hits = [Hit(d["id"], f"{d['id']}#0", d["text"], 1.0, 0, len(d["text"]), d["title"])
                for d in (docs[i], docs[(i + 1) % len(docs)])]
        prompts.append(prompt_ids(tokenizer, [{"role": "user", "content": q["question"]}], hits, RagConfig()))
    return prompts


def engine_throughput(engine, prompts: list[list[int]], concurrency: int, total: int, max_tokens: int) -> dict:
    """`concurrency` closed-loop clients on one RunningBatch, each sending its next request the step its last
    one ends, until `total` requests are answered (greedy). Besides tokens/s (wall and per CPU-second, which a
    shared machine disturbs less): time to first token and the longest pause between two pieces of a stream."""
    from ragft.generate.engine import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    batch, tokens, sent_at, last, ttft, pauses = engine.open_batch(), 0, [], {}, [], []

    def send() -> None:
        n = len(sent_at)
        batch.add(n, GenerationRequest(f"r{n}", engine.models[0], tuple(prompts[n % len(prompts)]), params))
        sent_at.append(time.perf_counter())

    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(min(concurrency, total)):
        send()
    while batch.busy:
        out = batch.step()
        now = time.perf_counter()
        for key, delta in out.items():
            if key in last:
                pauses.append(now - last[key])
            else:
                ttft.append(now - sent_at[key])
            last[key] = now
            if delta.finish_reason is not None:
                tokens += delta.completion_tokens
                if len(sent_at) < total:
                    send()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens, "seconds": elapsed,
            "ttft_p50_s": _pct(ttft, 50), "ttft_max_s": _pct(ttft, 100), "pause_p50_s": _pct(pauses, 50),
            "pause_max_s": _pct(pauses, 100)}


def bench_engine(args) -> None:
    import torch

    import ragft.generate.transformers_engine
    from ragft.generate.transformers_engine import TransformersEngine

    if args.threads:
        torch.set_num_threads(args.threads)  # 1 on a shared machine: torch's threads wait for each other
    if args.dtype == "auto":
        from ragft.model.precision import auto_dtype

        dtype = auto_dtype("cpu")
    else:
        dtype = getattr(torch, args.dtype)
    budget = {} if args.max_prefill_tokens is None else {"max_prefill_tokens": args.max_prefill_tokens or None}
    engine = TransformersEngine(args.model, device="cpu", dtype=dtype, **budget)
    prompts = rag_prompts(engine.tokenizer)
    lengths = sorted(map(len, prompts))
    print(f"engine {ragft.generate.transformers_engine.__file__} "
          f"(prefill budget {getattr(engine, 'max_prefill_tokens', None)}), "
          f"{args.model}, {dtype}, {torch.get_num_threads()} threads; prompts "
          f"{lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), max_tokens={args.max_tokens}",
          flush=True)
    engine_throughput(engine, prompts, 2, 2, 2)  # warm-up: lazy imports and allocator growth
    for c in args.concurrency:
        r = engine_throughput(engine, prompts, c, args.total, args.max_tokens)
        print(f"concurrency {c:>2}: {r['tokens_per_s']:6.2f} tokens/s, {r['tokens_per_cpu_s']:6.2f} per CPU-second "
              f"({r['tokens']} tokens, {args.total} requests, {r['seconds']:.1f} s); first token p50 "
              f"{r['ttft_p50_s']:.1f} s, max {r['ttft_max_s']:.1f} s; pause in a stream p50 {r['pause_p50_s']:.2f} s, "
              f"max {r['pause_max_s']:.1f} s", flush=True)


def bench_vllm(args) -> None:
    """Bare vLLM offline, then the same prompts through `ragft serve` with serve.engine=vllm and with
    serve.engine=transformers at each --concurrency; one table of tokens/s."""
    import gc

    from ragft.model.build import load_tokenizer

    if args.dtype == "auto":  # what serve.dtype=auto picks on this machine, for every side
        from ragft.model.precision import auto_dtype

        args.dtype = str(auto_dtype("cpu")).removeprefix("torch.")
    tokenizer = load_tokenizer(args.model)
    prompts = rag_prompts(tokenizer)
    widest = max(args.concurrency)
    work = [prompts[i % len(prompts)] for i in range(args.total)]
    bare_tps, bare_start = _bare_vllm(args, work[:widest], work)
    gc.collect()

    import ray
    from ray import serve

    from ragft.serve.run import serve_env

    for key, value in serve_env(haproxy=not args.python_proxy).items():
        os.environ.setdefault(key, value)
    ray.init(configure_logging=False, log_to_driver=False)
    texts = [tokenizer.decode(p) for p in work]
    served, up = {}, {}
    try:
        for engine in ("vllm", "transformers"):
            url, model, up[engine] = _serve_app(args, engine, widest)
            for c in args.concurrency:
                _closed_loop(url, model, texts[:c], c, args.max_tokens)  # warm-up, as the bare run's
                tokens, seconds = _closed_loop(url, model, texts, c, args.max_tokens)
                served[engine, c] = tokens / seconds
                print(f"ragft serve serve.engine={engine}, concurrency {c}: {tokens} tokens in {seconds:.1f} s",
                      flush=True)
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{args.model}, {len(work)} RAG prompts (median {sorted(map(len, work))[len(work) // 2]} tokens), "
          f"max_tokens={args.max_tokens}, greedy, vLLM {'compiled' if args.compile else 'eager'}, dtype {args.dtype}; "
          f"start-up: bare vLLM {bare_start:.1f} s, app with vLLM {up['vllm']:.1f} s, with transformers "
          f"{up['transformers']:.1f} s\n")
    print("| concurrency | ragft serve, transformers engine | ragft serve, vLLM engine | bare vLLM offline (all at once) "
          "| vLLM engine / bare |")
    print("|---|---|---|---|---|")
    for c in args.concurrency:
        print(f"| {c} | {served['transformers', c]:.1f} tok/s | {served['vllm', c]:.1f} tok/s | {bare_tps:.1f} tok/s "
              f"| {served['vllm', c] / bare_tps:.2f} |")
    print("\ngoal: vLLM engine / bare >= 0.8 at concurrency 32")


def _serve_app(args, engine: str, widest: int) -> tuple[str, str, float]:
    """`ragft serve` on args.model with `engine`, in this process's Ray: its URL, model name and start-up seconds."""
    from ragft.config.compose import compose_config
    from ragft.serve.run import run_serve
    from ragft.serve.spec import validate_serve

    root = args.work_dir or Path(tempfile.mkdtemp(prefix="ragft-bench-vllm-"))
    vllm = [f"serve.vllm.enforce_eager={str(not args.compile).lower()}", f"serve.vllm.kv_cache_gb={args.kv_cache_gb}"]
    spec = validate_serve(compose_config("serve", [
        f"checkpoint={args.model}", f"serve.port={8124}", f"out_dir={root / f'run-{engine}'}", f"serve.engine={engine}",
        *(vllm if engine == "vllm" else []), f"serve.batch.max_batch_size={max(widest, 16)}",
        "serve.generator.max_ongoing_requests=128",
        # a slow machine must not cut answers short: every side generates the same tokens
        "serve.generation_timeout_s=900", "serve.request_timeout_s=1200",
        "serve.ingress.max_ongoing_requests=256", f"serve.dtype={args.dtype}"]))
    started = time.perf_counter()
    url = run_serve(spec, wait=False)["url"]
    return url, spec.default_model, time.perf_counter() - started


def _closed_loop(url: str, model: str, items: list[str], concurrency: int, max_tokens: int) -> tuple[int, float]:
    """`concurrency` clients, each sending its next /v1/completions request when the last returns, until `items`
    are answered: completion tokens and seconds."""
    import httpx

    queue, lock, counted = list(items), threading.Lock(), [0]

    def client_loop() -> None:
        with httpx.Client(timeout=900) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    text = queue.pop(0)
                body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
                response = client.post(f"{url}/completions", json=body)
                response.raise_for_status()
                with lock:
                    counted[0] += response.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    begun = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counted[0], time.perf_counter() - begun


def _bare_vllm(args, warm: list, work: list) -> tuple[float, float]:
    """tokens/s of `LLM.generate` on `work` (after one pass over `warm`), and the LLM's start-up seconds. vLLM as
    it runs by default: its engine core in a process of its own."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams

    started = time.perf_counter()
    kwargs = {} if args.kv_cache_gb is None else {"kv_cache_memory_bytes": int(args.kv_cache_gb * 2**30)}
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=not args.compile,
              seed=0, disable_log_stats=True, **kwargs)
    start_s = time.perf_counter() - started
    params = VLLMSamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    llm.generate([{"prompt_token_ids": list(p)} for p in warm], params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in work], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"bare vLLM: {tokens} tokens in {seconds:.1f} s", flush=True)
    del llm, outputs
    return tokens / seconds, start_s


def lora_checkpoint(base: Path, dest: Path, seed: int, rank: int) -> Path:
    """A random LoRA adapter (every linear layer) on `base` with a ragft manifest, as `ragft train` writes one."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ragft.checkpoints import MANIFEST, sha256_file

    if not (dest / MANIFEST).is_file():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                            init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(dest)
        files = {str(p.relative_to(dest)): sha256_file(p) for p in sorted(dest.rglob("*")) if p.is_file()}
        (dest / MANIFEST).write_text(json.dumps({"format": "ragft-checkpoint/1", "run_id": f"bench-{seed}",
                                                 "step": 1, "method": "lora", "metrics": {}, "files": files,
                                                 "model": {"name": base.name, "source": str(base)}}))
    return dest


# Open text to continue: unlike the questions, which a chat model may answer in one token, these run to max_tokens,
# so every request of the adapter-load bench costs the same and its percentiles measure the loads.
CONTINUATIONS = ["The ferry left the harbour at dawn, and", "Once upon a time, in a small harbour town,",
                 "The history of the ferry service began", "Passengers on the night ferry often"]


def bench_adapter_load(args) -> None:
    """Latency of requests on adapter A before and during runtime loads of adapter B, and the loads' duration."""
    import httpx
    import ray
    from ray import serve

    from ragft.config.compose import compose_config
    from ragft.serve.keys import ADMIN_KEY_ENV, API_KEYS_ENV
    from ragft.serve.run import run_serve, serve_env
    from ragft.serve.spec import validate_serve

    root = args.work_dir or Path(tempfile.mkdtemp(prefix="ragft-bench-adapters-"))
    base = Path(args.model).resolve()
    a = lora_checkpoint(base, root / "adapter-a", 1, args.lora_rank)
    b = lora_checkpoint(base, root / "adapter-b", 2, args.lora_rank)
    user, admin = "bench-user-key-0123456789", "bench-admin-key-0123456789"
    os.environ[API_KEYS_ENV], os.environ[ADMIN_KEY_ENV] = user, admin
    for key, value in serve_env(haproxy=not args.python_proxy).items():
        os.environ.setdefault(key, value)
    engine = [f"serve.engine={args.serve_engine}"] + (
        ["serve.vllm.enforce_eager=true", f"serve.vllm.kv_cache_gb={args.kv_cache_gb}"]
        if args.serve_engine == "vllm" else [])
    spec = validate_serve(compose_config("serve", [
        f"checkpoint={a}", "serve.name=A", "index.path=null", f"serve.port={8125}", f"out_dir={root / 'run'}",
        *engine, f"serve.dtype={args.dtype}", "serve.generation_timeout_s=300", "serve.request_timeout_s=600"]))
    ray.init(configure_logging=False, log_to_driver=False)
    url = run_serve(spec, wait=False)["url"]
    spans, lock, stop = [], threading.Lock(), threading.Event()

    def client_loop(i: int) -> None:
        body = {"model": "A", "prompt": CONTINUATIONS[i % len(CONTINUATIONS)], "max_tokens": args.max_tokens,
                "temperature": 0}
        with httpx.Client(timeout=600, headers={"authorization": f"Bearer {user}"}) as client:
            while not stop.is_set():
                started = time.perf_counter()
                answer = client.post(f"{url}/completions", json=body)
                answer.raise_for_status()
                with lock:
                    spans.append((started, time.perf_counter(), answer.json()["usage"]["completion_tokens"]))

    loads = []
    try:
        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.concurrency[0])]
        for t in threads:
            t.start()
        time.sleep(args.seconds)  # before: warm-up included, cut below
        with httpx.Client(timeout=600, headers={"authorization": f"Bearer {admin}"}) as client:
            root_url = url.removesuffix("/v1")
            for _ in range(args.loads):
                started = time.perf_counter()
                answer = client.post(f"{root_url}/v1/adapters", json={"name": "B", "checkpoint": str(b)})
                answer.raise_for_status()
                loads.append((started, time.perf_counter(), answer.json()["load_s"]))
                time.sleep(1.0)
                client.delete(f"{root_url}/v1/adapters/B").raise_for_status()
                time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
    finally:
        serve.shutdown()
        ray.shutdown()
    first = loads[0][0] if loads else float("inf")
    # Only requests that ran the full max_tokens: answers of other lengths (a question the model ends at once)
    # would make the percentiles measure the prompt mix instead of the loads.
    full = [(s, e) for s, e, tokens in spans if tokens == args.max_tokens]
    warm = [s for s in full if s[0] > spans[0][1]]  # from the first request's end on
    before = [(e - s) * 1000 for s, e in warm if e < first]
    during = [(e - s) * 1000 for s, e in full if any(s < le and e > ls for ls, le, _ in loads)]
    print(f"\n{base.name}, serve.engine={args.serve_engine}, LoRA rank {args.lora_rank} on every linear layer, "
          f"{args.concurrency[0]} closed-loop clients on A, max_tokens={args.max_tokens}, {args.loads} loads of B; "
          f"latencies of the {len(full)} of {len(spans)} requests that ran all {args.max_tokens} tokens")
    if not loads:
        print(f"A's request latency, no load: p50 {_pct(before, 50):.0f} ms, p99 {_pct(before, 99):.0f} ms, max "
              f"{max(before):.0f} ms ({len(before)} requests)")
        return
    print(f"load (POST /v1/adapters, server-side load_s): p50 {_pct([l for _, _, l in loads], 50) * 1000:.0f} ms, "
          f"max {max(l for _, _, l in loads) * 1000:.0f} ms; client-side p50 "
          f"{_pct([(e - s) for s, e, _ in loads], 50) * 1000:.0f} ms")
    print(f"A's request latency before any load: p50 {_pct(before, 50):.0f} ms, p99 {_pct(before, 99):.0f} ms "
          f"({len(before)} requests)")
    print(f"A's request latency in flight during a load: p50 {_pct(during, 50):.0f} ms, p99 {_pct(during, 99):.0f} ms "
          f"({len(during)} requests)")


def _pct(values: list[float], q: float) -> float:
    """The q-th percentile of `values` (one of them: nearest rank), NaN when there are none."""
    return float(np.percentile(values, q, method="nearest")) if len(values) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="requests for the overhead measurement")
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per throughput point")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--python-proxy", action="store_true", help="Ray Serve's Python proxy instead of HAProxy")
    parser.add_argument("--model", default=None, help="a model folder to serve instead of the tiny random model")
    parser.add_argument("--engine", action="store_true", help="the engine alone on RAG prompts (needs --model)")
    parser.add_argument("--vllm", action="store_true", help="bare vLLM vs ragft serve serve.engine=vllm (needs --model)")
    parser.add_argument("--compile", action="store_true", help="--vllm: let vLLM compile the model (minutes on CPU)")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0, help="--vllm: vLLM's KV cache in GiB")
    parser.add_argument("--total", type=int, default=64, help="--engine: requests answered per concurrency")
    parser.add_argument("--dtype", default="auto", help="--engine: auto | float32 | bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="--engine: torch threads (0: torch's default)")
    parser.add_argument("--max-prefill-tokens", type=int, default=None, help="--engine: the engine's prefill budget "
                        "per step (default: the engine's; 0: none, every waiting request joins at once)")
    parser.add_argument("--adapter-load", action="store_true", help="latency during runtime adapter loads (needs --model)")
    parser.add_argument("--serve-engine", default="transformers", help="--adapter-load: transformers | vllm")
    parser.add_argument("--loads", type=int, default=10, help="--adapter-load: loads (each unloaded again)")
    parser.add_argument("--lora-rank", type=int, default=16, help="--adapter-load: the adapters' LoRA rank")
    args = parser.parse_args()
    if args.adapter_load:
        if args.model is None:
            parser.error("--adapter-load needs --model")
        bench_adapter_load(args)
        return
    if args.engine or args.vllm:
        if args.model is None:
            parser.error("--engine and --vllm need --model")
        (bench_vllm if args.vllm else bench_engine)(args)
        return

    import ray
    from ray import serve

    from ragft.serve.run import run_serve, serve_env

    root = args.work_dir or Path(tempfile.mkdtemp(prefix="ragft-bench-serve-"))
    base, index = prepare(root)
    base = Path(args.model) if args.model else base
    for key, value in serve_env(haproxy=not args.python_proxy).items():  # as `ragft serve` starts Ray
        os.environ.setdefault(key, value)
    ray.init(configure_logging=False, log_to_driver=False)
    port = 8123
    results = {}
    try:
        for batching in (True, False):
            spec = serve_spec(base, index, port, batching, root / f"run-{'on' if batching else 'off'}")
            info = run_serve(spec, wait=False)
            url = info["url"]
            row = {"overhead": overhead(url, args.requests, 8) if batching else None}
            for c in args.concurrency:
                row[c] = throughput(url, c, args.seconds, args.max_tokens)
                print(f"batching {'on ' if batching else 'off'} concurrency {c:>2}: {row[c]:8.1f} tokens/s", flush=True)
            results[batching] = row
            serve.delete(spec.serve.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()

    o = results[True]["overhead"]
    print(f"\nserving overhead per request (batching on, concurrency 1, retrieval on, {args.requests} requests): "
          f"p50 {o['p50_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms  (goal: p50 <= 15 ms)")
    print(f"  end-to-end p50 {o['e2e_p50_ms']:.1f} ms = retrieval p50 {o['retrieval_p50_ms']:.1f} ms + "
          f"generation p50 {o['generation_p50_ms']:.1f} ms (8 tokens) + overhead")
    print(f"\ngenerated tokens/s, {args.model or 'tiny model'}, max_tokens={args.max_tokens}, retrieval off:")
    print(f"  {'concurrency':>11} {'batching on':>12} {'batching off':>13} {'ratio':>7}")
    for c in args.concurrency:
        on, off = results[True][c], results[False][c]
        print(f"  {c:>11} {on:>12.1f} {off:>13.1f} {on / off:>6.2f}x")
    if 8 in args.concurrency:
        ratio = results[True][8] / results[False][8]
        print(f"\nbatching speed-up at concurrency 8: {ratio:.2f}x (goal: >= 3x)")


if __name__ == "__main__":
    main()
