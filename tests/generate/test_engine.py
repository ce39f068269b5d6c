"""The generation engine against transformers' own `generate`: batching, adapters, stops, sampling, limits.

Every comparison is token-exact in the sense that matters to a client: the engine's text and
token count for a row equal those of `generate` on that row's model alone. The tiny base has a
scaled-up lm_head (helpers.serve_models), so greedy argmax margins are wide and padding or
batching cannot flip a token.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers.serve_models import build_full_model, build_lora_adapter, build_tiny_base
from ragft.generate.detokenize import IncrementalDetokenizer
from ragft.generate.engine import Delta, GenerationRequest, SamplingParams
from ragft.generate.transformers_engine import TransformersEngine

PROMPTS = [
    "The ferry Fousond",
    "Hello there, captain",
    "Which yard constructed the hull of the ferry Stouson? Answer in one short sentence, please.",
    "Bicycles travel free of charge on the night ferries of the Orrenvald Isles",
    "Who currently skippers the ferry Gufofour?",
]


@dataclass(frozen=True)
class Models:
    base: Path
    a: Path
    b: Path
    full: Path


@pytest.fixture(scope="session")
def engine_models(tmp_path_factory, cache_dir) -> Models:
    root = tmp_path_factory.mktemp("engine-models")
    base = build_tiny_base(root / "base", cache_dir)
    return Models(base, build_lora_adapter(base, root / "a", seed=1), build_lora_adapter(base, root / "b", seed=2),
                  build_full_model(base, root / "full", seed=3))


@pytest.fixture(scope="module")
def engine(engine_models) -> TransformersEngine:
    torch.set_num_threads(2)
    adapters = {"a": str(engine_models.a), "b.v2": str(engine_models.b)}  # "b.v2": not a valid PEFT adapter name
    return TransformersEngine(str(engine_models.base), adapters=adapters, full_models={"full": str(engine_models.full)})


class Reference:
    """Each served model on its own, run by transformers' `generate`."""

    def __init__(self, models: Models, stop_token_ids: frozenset[int]):
        self.peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models.base), models.a,
                                              adapter_name="a").eval()
        self.peft.load_adapter(str(models.b), adapter_name="b.v2".replace(".", "_"))
        self.full = AutoModelForCausalLM.from_pretrained(models.full).eval()
        self.eos = sorted(stop_token_ids)
        self._memo: dict[tuple, list[int]] = {}

    def ids(self, model: str, prompt: tuple[int, ...], n: int) -> list[int]:
        """The greedy completion's token ids, through the first stop token."""
        key = (model, prompt, n)
        if key not in self._memo:
            self._memo[key] = self._generate(model, prompt, n)
        return self._memo[key]

    def _generate(self, model: str, prompt: tuple[int, ...], n: int) -> list[int]:
        kwargs = dict(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=self.eos,
                      pad_token_id=0)
        with torch.inference_mode():
            if model == "full":
                out = self.full.generate(**kwargs)
            elif model == "base":
                with self.peft.disable_adapter():
                    out = self.peft.generate(**kwargs)
            else:
                self.peft.set_adapter(model.replace(".", "_"))
                out = self.peft.generate(**kwargs)
        ids = out[0, len(prompt):].tolist()
        stop = next((i for i, t in enumerate(ids) if t in self.eos), None)
        return ids if stop is None else ids[: stop + 1]


@pytest.fixture(scope="module")
def ref(engine_models, engine) -> Reference:
    return Reference(engine_models, engine.stop_token_ids)


@dataclass
class Result:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    timed_out: bool = False
    deltas: list[Delta] = field(default_factory=list)


def run(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[Result]:
    """Drive `generate` to the end, checking the stepping contract on the way."""
    results = [Result() for _ in requests]
    steps = 0
    for out in engine.generate(requests):
        steps += 1
        assert len(out) == len(requests)
        for request, result, delta in zip(requests, results, out):
            if delta is None:
                continue
            assert result.finish_reason is None, f"{request.request_id}: a Delta after its final one"
            assert delta.request_id == request.request_id
            assert delta.completion_tokens >= result.tokens
            result.deltas.append(delta)
            result.text += delta.text
            result.tokens = delta.completion_tokens
            result.finish_reason, result.timed_out = delta.finish_reason, delta.timed_out
    assert all(r.finish_reason in ("stop", "length") for r in results), "the generator ended with requests open"
    assert steps >= max((r.tokens for r in results), default=0)
    return results


def encode(engine: TransformersEngine, text: str) -> tuple[int, ...]:
    return tuple(engine.tokenizer(text, add_special_tokens=False).input_ids)


def greedy(rid: str, model: str, prompt: tuple[int, ...], n: int, **params) -> GenerationRequest:
    return GenerationRequest(rid, model, prompt, SamplingParams(max_tokens=n, temperature=0.0, **params))


def assert_matches(engine, ref, request: GenerationRequest, result: Result) -> None:
    ids = ref.ids(request.model, request.prompt_ids, request.params.max_tokens)
    want = engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert (result.text, result.tokens) == (want, len(ids)), f"{request.request_id} ({request.model})"
    ended_on_eos = len(ids) < request.params.max_tokens or ids[-1] in engine.stop_token_ids
    assert result.finish_reason == ("stop" if ended_on_eos else "length")


@pytest.mark.parametrize("model", ["base", "a", "b.v2", "full"])
def test_single_request_matches_generate(engine, ref, model):
    request = greedy("r", model, encode(engine, PROMPTS[0]), 16)
    (result,) = run(engine, [request])
    assert_matches(engine, ref, request, result)
    assert len(result.deltas) > 1, "a completion of 16 tokens should stream in several pieces"


def test_models_differ(engine, ref):
    """Otherwise the mixed-batch tests below could not tell the models apart."""
    prompt = encode(engine, PROMPTS[0])
    outputs = {model: tuple(ref.ids(model, prompt, 16)) for model in engine.models}
    assert len(set(outputs.values())) == len(outputs)


def test_left_padded_batch_matches_each_prompt_alone(engine, ref):
    requests = [greedy(f"r{i}", "base", encode(engine, p), 12) for i, p in enumerate(PROMPTS)]
    assert len({len(r.prompt_ids) for r in requests}) == len(requests)
    for request, result in zip(requests, run(engine, requests)):
        assert_matches(engine, ref, request, result)


def test_mixed_adapter_batch_matches_each_model_alone(engine, ref):
    models = ["base", "a", "b.v2", "a", "base", "b.v2", "a"]
    requests = [greedy(f"r{i}", m, encode(engine, PROMPTS[i % len(PROMPTS)]), 12) for i, m in enumerate(models)]
    for request, result in zip(requests, run(engine, requests)):
        assert_matches(engine, ref, request, result)


def test_full_model_rows_batch_with_adapter_rows(engine, ref):
    models = ["a", "full", "base", "full", "b.v2"]
    requests = [greedy(f"r{i}", m, encode(engine, PROMPTS[i]), 10) for i, m in enumerate(models)]
    for request, result in zip(requests, run(engine, requests)):
        assert_matches(engine, ref, request, result)


def test_rows_finishing_at_different_steps(engine, ref):
    # The longest prompt finishes first, so the survivors' cache loses its leading padding columns.
    lengths = sorted(PROMPTS, key=len, reverse=True)
    plan = [("base", 1), ("a", 3), ("full", 2), ("b.v2", 9), ("base", 16)]
    requests = [greedy(f"r{i}", m, encode(engine, p), n) for i, ((m, n), p) in enumerate(zip(plan, lengths))]
    results = run(engine, requests)
    for request, result in zip(requests, results):
        assert_matches(engine, ref, request, result)
    assert [r.tokens for r in results] == [n for _, n in plan]


def test_one_forward_per_weights_and_finished_rows_leave_the_batch(engine, monkeypatch):
    from ragft.generate.decode_group import DecodeGroup

    calls = []
    forward = DecodeGroup.forward

    def spy(self, ids, mask, positions, cache, adapters):
        calls.append((self.weights.mixed, ids.shape[0], mask.shape[1]))
        return forward(self, ids, mask, positions, cache, adapters)

    monkeypatch.setattr(DecodeGroup, "forward", spy)
    long, short = encode(engine, PROMPTS[2]), encode(engine, PROMPTS[0])
    requests = [greedy("long", "base", long, 2), greedy("a", "a", short, 4), greedy("b", "b.v2", short, 6),
                greedy("f", "full", short, 3)]
    steps = []
    for _ in engine.generate(requests):
        steps.append(calls[:])
        calls.clear()
    shared = [[c for c in step if c[0]] for step in steps]
    full = [[c for c in step if not c[0]] for step in steps]
    assert [len(s) for s in shared] == [1] * 6  # base and both adapters: one forward per step
    assert [s[0][1] for s in shared] == [3, 3, 2, 2, 1, 1]  # rows leave the step after they finish
    assert [len(f) for f in full] == [1, 1, 1, 0, 0, 0]
    assert shared[1][0][2] == len(long) + 1
    assert shared[2][0][2] == len(short) + 2  # prompt + the token fed now + one before: the padding is gone


def test_without_served_base(engine_models, engine, ref):
    small = TransformersEngine(str(engine_models.base), base_name=None,
                               adapters={"a": str(engine_models.a), "b.v2": str(engine_models.b)})
    assert small.models == ["a", "b.v2"]
    requests = [greedy(f"r{i}", ["a", "b.v2"][i % 2], encode(engine, p), 8) for i, p in enumerate(PROMPTS)]
    for request, result in zip(requests, run(small, requests)):
        assert_matches(engine, ref, request, result)
    with pytest.raises(ValueError, match="unknown model 'base'"):
        small.generate([greedy("r", "base", (5, 6), 4)])


def test_prefill_budget_admits_a_burst_over_steps_and_answers_as_one_by_one(engine, ref, monkeypatch):
    """A burst of requests larger than the prefill budget joins over several steps, in arrival order, while the
    rows already in keep decoding at every step; each answer equals the same request generated alone (one by
    one, and transformers' `generate`)."""
    from ragft.generate.decode_group import DecodeGroup

    models = ["base", "a", "full", "b.v2", "a", "base", "full", "b.v2", "base", "a"]
    requests = [greedy(f"r{i}", m, encode(engine, PROMPTS[i % len(PROMPTS)]), 6 + i % 5) for i, m in enumerate(models)]
    alone = [run(engine, [request])[0] for request in requests]

    budget = 2 * max(len(r.prompt_ids) for r in requests)  # at least two requests join per step
    monkeypatch.setattr(engine, "max_prefill_tokens", budget)
    calls = []
    forward = DecodeGroup.forward

    def spy(self, ids, mask, positions, cache, adapters):
        calls.append(tuple(ids.shape))
        return forward(self, ids, mask, positions, cache, adapters)

    monkeypatch.setattr(DecodeGroup, "forward", spy)
    results, first_step, steps = [Result() for _ in requests], {}, []
    for i, out in enumerate(engine.generate(requests)):
        steps.append(calls[:])
        calls.clear()
        for k, delta in enumerate(out):
            if delta is not None:
                first_step.setdefault(k, i + 1 - delta.completion_tokens)  # a row gains a token per step
                results[k].text += delta.text
                results[k].tokens, results[k].finish_reason = delta.completion_tokens, delta.finish_reason

    prefills = [shape for step in steps for shape in step if shape[1] > 1]
    assert all(rows * width <= budget for rows, width in prefills)
    joined = [first_step[k] for k in range(len(requests))]  # the step of each request's first token
    assert joined == sorted(joined), "requests join in arrival order"
    assert joined[-1] >= 2, f"the burst should join over 3+ steps: {joined}"
    for step in steps[1 : joined[-1] + 1]:
        assert any(width == 1 for _, width in step), "rows already decoding waited for a prefill"
    for request, result, one in zip(requests, results, alone):
        assert (result.text, result.tokens, result.finish_reason) == (one.text, one.tokens, one.finish_reason)
        assert_matches(engine, ref, request, result)


def test_stop_strings_truncate_and_are_not_returned(engine, ref):
    prompt = encode(engine, PROMPTS[2])
    full_text = engine.tokenizer.decode(ref.ids("a", prompt, 16), skip_special_tokens=True)
    assert len(full_text) > 20
    stop = full_text[9:12]
    later = full_text[15:18]
    requests = [
        greedy("one", "a", prompt, 16, stop=(stop,)),
        greedy("first-wins", "a", prompt, 16, stop=(later, stop)),
        greedy("never", "a", prompt, 16, stop=(stop + "\x00",)),  # its start shows up, so it is held, then released
        greedy("plain", "a", prompt, 16),
    ]
    one, first_wins, never, plain = run(engine, requests)
    expected = full_text[: full_text.find(stop)]
    assert (one.text, one.finish_reason) == (expected, "stop")
    first = min(full_text.find(later), full_text.find(stop))
    assert (first_wins.text, first_wins.finish_reason) == (full_text[:first], "stop")
    assert stop not in one.text
    assert one.tokens < 16
    assert (never.text, never.finish_reason, never.tokens) == (full_text, "length", 16)
    assert plain.text == full_text


def test_eos_token_stops_and_is_not_text(engine, ref, monkeypatch):
    prompt = encode(engine, PROMPTS[1])
    ids = ref.ids("base", prompt, 16)
    eos_at = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # its first occurrence
    monkeypatch.setattr(engine, "stop_token_ids", frozenset({ids[eos_at]}))
    (result,) = run(engine, [greedy("r", "base", prompt, 16)])
    assert result.finish_reason == "stop"
    assert result.tokens == eos_at + 1  # the end-of-sequence token counts as generated, as in OpenAI's usage
    assert result.text == engine.tokenizer.decode(ids[:eos_at], skip_special_tokens=True)


def sampled(rid: str, model: str, prompt, seed, n: int = 16, temperature: float = 2.0, top_p: float = 1.0):
    return GenerationRequest(rid, model, prompt, SamplingParams(max_tokens=n, temperature=temperature, top_p=top_p,
                                                                seed=seed))


def test_seeded_sampling_is_reproducible_alone_and_batched(engine):
    prompt = encode(engine, PROMPTS[0])
    alone = run(engine, [sampled("s", "a", prompt, seed=7)])[0]
    again = run(engine, [sampled("s", "a", prompt, seed=7)])[0]
    batch = [greedy("g0", "base", encode(engine, PROMPTS[2]), 5), sampled("o", "a", encode(engine, PROMPTS[3]), 8),
             sampled("s", "a", prompt, seed=7), sampled("f", "full", prompt, 9, n=3), greedy("g1", "b.v2", prompt, 20)]
    batched = run(engine, batch)[2]
    assert alone.text == again.text == batched.text
    assert alone.tokens == batched.tokens


def test_different_seeds_differ(engine):
    prompt = encode(engine, PROMPTS[0])
    texts = {run(engine, [sampled("s", "base", prompt, seed=s)])[0].text for s in range(4)}
    assert len(texts) == 4


def test_tiny_top_p_is_greedy(engine, ref):
    prompt = encode(engine, PROMPTS[3])
    request = sampled("r", "b.v2", prompt, seed=None, n=12, temperature=1.5, top_p=1e-6)
    (result,) = run(engine, [request])
    assert_matches(engine, ref, greedy("r", "b.v2", prompt, 12), result)


def test_deadline_in_the_past_finishes_without_tokens(engine, ref):
    prompt = encode(engine, PROMPTS[0])
    late = GenerationRequest("late", "a", prompt, SamplingParams(max_tokens=8, temperature=0), deadline=time.time() - 1)
    on_time = greedy("ok", "a", prompt, 8)
    steps = list(engine.generate([late, on_time]))
    assert steps[0][0] == Delta("late", "", 0, "length", timed_out=True)
    assert all(step[0] is None for step in steps[1:])
    on_time_deltas = [step[1] for step in steps if step[1] is not None]
    result = Result("".join(d.text for d in on_time_deltas), on_time_deltas[-1].completion_tokens,
                    on_time_deltas[-1].finish_reason)
    assert_matches(engine, ref, on_time, result)


def test_deadline_stops_a_long_generation(engine):
    request = GenerationRequest("r", "base", encode(engine, PROMPTS[0]), SamplingParams(max_tokens=1000, temperature=0),
                                deadline=time.time() + 0.5)
    (result,) = run(engine, [request])
    assert (result.finish_reason, result.timed_out) == ("length", True)
    assert 0 < result.tokens < 1000


def test_completion_is_capped_by_the_context(engine):
    prompt = (encode(engine, " ".join(PROMPTS)) * 100)[: engine.context_length - 3]
    (result,) = run(engine, [greedy("r", "base", prompt, 10)])
    assert (result.finish_reason, result.tokens) == ("length", 3)


@pytest.mark.parametrize("request_, message", [
    (greedy("r", "nope", (5, 6), 4), "unknown model 'nope'"),
    (greedy("r", "base", (5,) * 1024, 4), "1024 tokens"),
    (greedy("r", "base", (5, 6), 0), "max_tokens must be at least 1"),
    (greedy("r", "base", (), 4), "prompt is empty"),
    (greedy("r", "base", (5, 1 << 20), 4), "token ids"),
    (sampled("r", "base", (5, 6), seed=1, top_p=0.0), "top_p"),
    (greedy("r", "base", (5, 6), 4, stop=("",)), "stop strings"),
])
def test_invalid_requests_raise_before_any_compute(engine, request_, message):
    fine = greedy("fine", "base", (5, 6), 4)
    with pytest.raises(ValueError, match=message):
        engine.generate([fine, request_])  # raises at the call, not at the first next()


@pytest.mark.parametrize("model", ["base", "a", "full"])
def test_deltas_carry_the_sampled_token_ids(engine, ref, model):
    """Each Delta's token_ids are the tokens sampled since the previous one, the stopping EOS included (as vLLM
    reports them): what the OpenAI routes report logprobs for."""
    request = greedy("r", model, encode(engine, PROMPTS[1]), 12)
    (result,) = run(engine, [request])
    sent = [t for d in result.deltas for t in d.token_ids]
    assert sent == ref.ids(model, request.prompt_ids, 12) and len(sent) == result.tokens


def reference_logprobs(ref, model: str, ids: list[int]) -> torch.Tensor:
    """log-softmax of each position's logits from the model alone, in one plain forward."""
    with torch.inference_mode():
        if model == "full":
            logits = ref.full(input_ids=torch.tensor([ids])).logits
        elif model == "base":
            with ref.peft.disable_adapter():
                logits = ref.peft(input_ids=torch.tensor([ids])).logits
        else:
            ref.peft.set_adapter(model.replace(".", "_"))
            logits = ref.peft(input_ids=torch.tensor([ids])).logits
    return torch.log_softmax(logits[0].float(), -1)


@pytest.mark.parametrize("model, start", [("base", 1), ("b.v2", 1), ("full", 5), ("a", 9)])
def test_token_logprobs_match_a_plain_forward(engine, ref, model, start):
    ids = list(encode(engine, PROMPTS[2]))
    got = engine.token_logprobs(model, ids, start, top_k=3)
    want = reference_logprobs(ref, model, ids)
    assert [t.token_id for t in got] == ids[start:]
    for position, t in enumerate(got, start):
        row = want[position - 1]  # position t - 1 predicts token t
        assert t.logprob == pytest.approx(float(row[ids[position]]), abs=1e-4)
        values, indices = row.topk(3)
        assert [i for i, _ in t.top] == indices.tolist()
        assert [v for _, v in t.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert engine.token_logprobs(model, ids, len(ids)) == []


def test_token_logprobs_projected_in_chunks_match_one_projection(engine, monkeypatch):
    import ragft.generate.transformers_engine as transformers_engine

    ids = list(encode(engine, PROMPTS[2]))
    whole = engine.token_logprobs("a", ids, 1, top_k=2)
    monkeypatch.setattr(transformers_engine, "LOGPROB_CHUNK", 3)  # several chunks, the last one partial
    chunked = engine.token_logprobs("a", ids, 1, top_k=2)
    assert [t.token_id for t in chunked] == [t.token_id for t in whole]
    assert [t.logprob for t in chunked] == pytest.approx([t.logprob for t in whole], abs=1e-5)
    assert [[i for i, _ in t.top] for t in chunked] == [[i for i, _ in t.top] for t in whole]


@pytest.mark.parametrize("args, message", [(("nope", [5, 6], 1), "unknown model"), (("base", [5, 6], 0), "start"),
                                           (("base", [5, 6], 3), "start"), (("base", [5, 1 << 20], 1), "token ids")])
def test_token_logprobs_refuse_bad_arguments(engine, args, message):
    with pytest.raises(ValueError, match=message):
        engine.token_logprobs(*args)


def test_no_requests(engine):
    assert list(engine.generate([])) == []


def test_engine_rejects_duplicate_model_names(engine_models):
    with pytest.raises(ValueError, match="unique"):
        TransformersEngine(str(engine_models.base), adapters={"base": str(engine_models.a)})


UNICODE = "naïve café ☕ 日本 — ok! 🚢 ferry"


@pytest.mark.parametrize("stops", [(), ("☕",), ("日本 —", "ok"), ("ok! 🚢",), ("e", "fé"), ("not there",),
                                   ("ferry",)])
def test_detokenizer_pieces_add_up_to_the_decode(engine, stops):
    tok = engine.tokenizer
    ids = encode(engine, UNICODE)
    assert len(ids) > len(UNICODE) // 2, "the sample tokenizer should split these characters into byte tokens"
    stream = IncrementalDetokenizer(tok, stops)
    pieces, stopped = [], False
    for token in ids:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        piece, stopped = stream.finish()
        pieces.append(piece)
    found = [UNICODE.find(s) for s in stops if s in UNICODE]
    expected = UNICODE[: min(found)] if found else UNICODE
    assert "".join(pieces) == expected
    assert stopped == bool(found)
    assert not any("\ufffd" in p for p in pieces), "half a character was sent"


@pytest.mark.parametrize("lstrip", [False, True])
def test_detokenizer_on_random_tokens_matches_decode(engine, lstrip):
    """Random ids (byte tokens, special tokens, broken UTF-8), some after whitespace tokens, against one
    decode of the whole sequence (without its leading whitespace under `lstrip`, as chat replies are sent)."""
    tok, rng = engine.tokenizer, random.Random(0)
    spaces = list(encode(engine, " \n  "))
    for i in range(30):
        ids = spaces[: i % 4] + [rng.randrange(len(tok)) for _ in range(40)]
        stops = tuple(rng.sample(["e", "an", "\ufffd", "the", "ae", "ferry"], 2))
        stream = IncrementalDetokenizer(tok, stops, lstrip=lstrip)
        text, stopped = "", False
        for token in ids:
            piece, stopped = stream.push(token)
            text += piece
            if stopped:
                break
        if not stopped:
            text += stream.finish()[0]
        full = tok.decode(ids, skip_special_tokens=True)
        found = [full.find(s) for s in stops if s in full]
        expected = full[: min(found)] if found else full
        assert text == (expected.lstrip() if lstrip else expected)


def _drain(batch, into: dict[str, Result]) -> None:
    for key, delta in batch.step().items():
        result = into.setdefault(key, Result())
        assert result.finish_reason is None, f"{key}: a Delta after its final one"
        result.text += delta.text
        result.tokens = delta.completion_tokens
        result.finish_reason = delta.finish_reason


def test_requests_joining_a_running_batch_match_each_alone(engine, ref):
    """Continuous batching: rows admitted mid-decode (other models, longer and shorter prompts) are exact."""
    batch, results = engine.open_batch(), {}
    first = [greedy("r0", "base", encode(engine, PROMPTS[0]), 16), greedy("r1", "full", encode(engine, PROMPTS[1]), 12)]
    later = [greedy("r2", "a", encode(engine, PROMPTS[2]), 10), greedy("r3", "b.v2", encode(engine, PROMPTS[3]), 14),
             greedy("r4", "full", encode(engine, PROMPTS[4]), 6)]
    for request in first:
        batch.add(request.request_id, request)
    for _ in range(3):
        _drain(batch, results)
    assert batch.running == 2
    for request in later:  # joins rows that are 3 tokens in: caches of different widths stacked
        batch.add(request.request_id, request)
    _drain(batch, results)
    assert batch.running == 5
    while batch.busy:
        _drain(batch, results)
    for request in first + later:
        assert_matches(engine, ref, request, results[request.request_id])


def test_max_rows_one_serves_requests_one_after_another(engine, ref):
    batch, results = engine.open_batch(max_rows=1), {}
    requests = [greedy(f"r{i}", "a", encode(engine, PROMPTS[i]), 5) for i in range(3)]
    for request in requests:
        batch.add(request.request_id, request)
    order = []
    while batch.busy:
        assert batch.running <= 1
        _drain(batch, results)
        order += [k for k, r in results.items() if r.finish_reason and k not in order]
    assert order == ["r0", "r1", "r2"]
    for request in requests:
        assert_matches(engine, ref, request, results[request.request_id])


def test_running_rows_are_not_held_up_by_one_token_requests_joining_every_step(engine, ref):
    """What a closed-loop benchmark does (launch/bench_serve.py --adapter-load): pairs of clients send the same
    prompt, and requests that end at their first token come back at every step. Each running row still takes
    one step per token (an 8-token request, 8 steps), and the rows of a pair finish on the same step."""
    batch, results = engine.open_batch(), {}
    long = [greedy(f"long{i}", "a", encode(engine, PROMPTS[2]), 8) for i in range(2)]
    for request in long:
        batch.add(request.request_id, request)
    finished_at = {}
    for step in range(1, 9):
        for i in range(2):  # an identical pair, prefilled and finished within the step
            short = greedy(f"short{step}-{i}", "a", encode(engine, PROMPTS[0]), 1)
            batch.add(short.request_id, short)
        _drain(batch, results)
        finished_at.update({k: step for k, r in results.items() if r.finish_reason and k not in finished_at})
    assert not batch.busy
    assert {k: v for k, v in finished_at.items() if k.startswith("long")} == {"long0": 8, "long1": 8}
    assert all(finished_at[f"short{step}-{i}"] == step for step in range(1, 9) for i in range(2))
    for request in long + [greedy("short1-0", "a", encode(engine, PROMPTS[0]), 1)]:
        assert_matches(engine, ref, request, results[request.request_id])


# --- adapters loaded and unloaded at runtime


def step_all(batch, results: dict[str, Result], steps: int | None = None) -> None:
    """Step `batch` (`steps` times, or until idle), collecting each key's text."""
    done = 0
    while batch.busy and (steps is None or done < steps):
        for key, delta in batch.step().items():
            result = results.setdefault(key, Result())
            assert result.finish_reason is None, f"{key}: a Delta after its final one"
            result.text += delta.text
            result.tokens, result.finish_reason = delta.completion_tokens, delta.finish_reason
        done += 1


def want_text(engine, ref, model: str, prompt, n: int) -> tuple[str, int]:
    ids = ref.ids(model, prompt, n)
    return engine.tokenizer.decode(ids, skip_special_tokens=True), len(ids)


@pytest.mark.parametrize("start_adapters", [{"a"}, set()], ids=["peft-base", "plain-base"])
def test_adapter_loaded_mid_batch_serves_and_running_rows_go_on(engine_models, engine, ref, start_adapters):
    """A load between two steps: rows already decoding (base, and adapter a when the engine started with it)
    finish exactly as alone, and the new name answers as PEFT does; on a base started without adapters the
    load turns it into a PEFT model in place."""
    live = TransformersEngine(str(engine_models.base), adapters={n: str(engine_models.a) for n in start_adapters})
    batch = live.open_batch()
    prompts = [encode(live, p) for p in PROMPTS[:3]]
    running = [("base", prompts[0])] + [("a", prompts[1])] * bool(start_adapters)
    for i, (model, prompt) in enumerate(running):
        batch.add(f"old{i}", greedy(f"old{i}", model, prompt, 16))
    results: dict[str, Result] = {}
    step_all(batch, results, steps=3)
    assert live.load_adapter("late", str(engine_models.b)) == []
    assert "late" in live.models and live.runtime_adapters == {"late": str(engine_models.b)}
    batch.add("new", greedy("new", "late", prompts[2], 12))
    step_all(batch, results)
    for i, (model, prompt) in enumerate(running):
        assert (results[f"old{i}"].text, results[f"old{i}"].tokens) == want_text(live, ref, model, prompt, 16)
    assert (results["new"].text, results["new"].tokens) == want_text(live, ref, "b.v2", prompts[2], 12)


def test_unloaded_adapter_finishes_running_rows_then_refuses_and_frees(engine_models, engine, ref):
    live = TransformersEngine(str(engine_models.base), adapters={"a": str(engine_models.a)})
    live.load_adapter("late", str(engine_models.b))
    before = set(live.peft_adapters)
    batch = live.open_batch()
    prompt = encode(live, PROMPTS[2])
    batch.add("r", greedy("r", "late", prompt, 12))
    results: dict[str, Result] = {}
    step_all(batch, results, steps=2)
    live.unload_adapter("late")
    assert "late" not in live.models and live.runtime_adapters == {}
    with pytest.raises(ValueError, match="unknown model 'late'"):
        batch.add("after", greedy("after", "late", prompt, 4))
    assert set(live.peft_adapters) == before  # still decoding "r"
    step_all(batch, results)
    assert (results["r"].text, results["r"].tokens) == want_text(live, ref, "b.v2", prompt, 12)
    assert len(live.peft_adapters) == len(before) - 1  # freed at the step "r" ended
    with pytest.raises(KeyError):
        live.unload_adapter("a")  # loaded at start-up: stays


def test_runtime_adapters_are_capped_least_recently_used_first(engine_models, engine):
    live = TransformersEngine(str(engine_models.base), adapters={"a": str(engine_models.a)}, max_adapters=2)
    a, b = str(engine_models.a), str(engine_models.b)
    assert live.load_adapter("x", a) == [] and live.load_adapter("y", b) == []
    run(live, [greedy("use-x", "x", (5, 6, 7), 2)])  # x is now the most recently used
    assert live.load_adapter("z", a) == ["y"]
    assert set(live.runtime_adapters) == {"x", "z"} and "y" not in live.models and "a" in live.models
    assert live.load_adapter("z", b) == []  # the same name again replaces it
    assert live.runtime_adapters["z"] == b
    with pytest.raises(ValueError, match="served since start-up"):
        live.load_adapter("a", b)
    capless = TransformersEngine(str(engine_models.base), max_adapters=0)
    with pytest.raises(ValueError, match="max_adapters=0"):
        capless.load_adapter("x", a)
