"""`ragft serve serve.engine=vllm` through the openai client, and `ragft eval eval.engine=vllm` against the
transformers engine, on the tiny base and its two LoRA checkpoints (the engine itself: test_vllm_engine.py).
Skipped where vLLM is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

pytest.importorskip("vllm")

import openai  # noqa: E402

from helpers.net import free_port  # noqa: E402

pytestmark = pytest.mark.ray


# --- ragft serve serve.engine=vllm, through the openai client


@dataclass
class Server:
    url: str
    corpus: dict = field(default_factory=dict)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(ray_cluster, serve_models, sample_index, compose_serve, tmp_path_factory):
    from ray import serve

    from ragft.jsonl import read_rows
    from ragft.sample import sample_path
    from ragft.serve.run import run_serve
    from ragft.serve.spec import validate_serve

    tmp = tmp_path_factory.mktemp("serve-vllm")
    cfg = compose_serve(f"checkpoint={serve_models.alpha}", "serve.name=alpha",
                        f"+serve.adapters.beta={serve_models.beta}", f"index.path={sample_index}",
                        f"serve.port={free_port()}", f"out_dir={tmp / 'run'}", "serve.engine=vllm",
                        "serve.vllm.enforce_eager=true", "serve.vllm.kv_cache_gb=1", "serve.retriever.max_replicas=1",
                        "serve.generator.num_cpus=0.5", "serve.retriever.num_cpus=0.5")
    corpus = {d["id"]: d for d in read_rows(sample_path("corpus.jsonl"))}
    try:
        info = run_serve(validate_serve(cfg), wait=False)
        yield Server(info["url"], corpus)
    finally:
        serve.shutdown()


def ask(client: openai.OpenAI, question: str, model: str = "alpha", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=kw.pop("max_tokens", 12), temperature=kw.pop("temperature", 0),
                                          **kw)


def test_served_chat_streams_and_cites(server, serve_models):
    from ragft.jsonl import read_rows
    from ragft.sample import sample_path

    question = read_rows(sample_path("qa.jsonl"))[1]["question"]
    client = server.client()
    whole = ask(client, question, max_tokens=16)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
    citations = whole.citations
    assert citations and all(server.corpus[c["doc_id"]]["text"][c["start"]:].startswith(c["quote"]) for c in citations)
    chunks = list(ask(client, question, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].citations == citations
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_served_completions_and_models(server):
    client, prompt = server.client(), "The home port of the Fousond is"
    plain = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0)
    assert plain.citations == [] and plain.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].text
    rag = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"rag": {"enabled": True, "k": 2}})
    assert len(rag.citations) == 2 and rag.usage.prompt_tokens > plain.usage.prompt_tokens
    outputs = {m: client.completions.create(model=m, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
               for m in ("base", "alpha", "beta")}
    assert len(set(outputs.values())) == 3, outputs


def test_logprobs_with_adapters_loaded_are_a_400_naming_the_parameter(server):
    """vLLM 0.32 cannot compute prompt logprobs with LoRA adapters loaded: the engine's refusal reaches the client as
    OpenAI's invalid-request error, not a 500."""
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().completions.create(model="alpha", prompt="The ferry", max_tokens=1, echo=True, logprobs=1)
    error = raised.value.body
    assert error["param"] == "logprobs" and error["code"] == "unsupported_parameter", error
    assert "LoRA adapters" in error["message"] and "Traceback" not in error["message"], error


# --- ragft eval eval.engine=vllm


def test_eval_with_vllm_answers_as_with_transformers(ray_cluster, serve_models, sample_index, tmp_path):
    """The same questions, prompts and greedy answers whichever engine `ragft eval` runs (tiny model, fp32: exact;
    in bf16 the two engines' kernels round differently)."""
    from ragft.config.compose import compose_config
    from ragft.errors import ConfigError
    from ragft.eval.run import run_eval
    from ragft.eval.spec import validate_eval

    def evaluate(engine: str, *extra: str):
        return validate_eval(compose_config("eval", [
            f"checkpoint={serve_models.alpha}", f"index.path={sample_index}", f"out_dir={tmp_path / engine}",
            f"registry.path={tmp_path / 'registry.jsonl'}", "eval.max_questions=4", "eval.systems=[base_rag,ft_rag]",
            "eval.max_tokens=12", "eval.num_workers=1", f"eval.engine={engine}", "eval.dtype=float32", *extra]))

    with pytest.raises(ConfigError, match="eval.perplexity=false"):
        evaluate("vllm")
    answers = {}
    for engine, extra in (("transformers", ()), ("vllm", ("eval.vllm.enforce_eager=true", "eval.vllm.kv_cache_gb=1"))):
        questions = run_eval(evaluate(engine, "eval.perplexity=false", *extra), progress=lambda line: None)["questions"]
        # A completion that ends inside a character (the tiny model emits stray UTF-8 fragments): ragft's detokenizer
        # flushes the fragment as U+FFFD when the completion ends, vLLM's drops it.
        answers[engine] = [(q["id"], s, q["answers"][s]["text"].rstrip("\ufffd"), q["answers"][s]["tokens"])
                           for q in questions for s in ("base_rag", "ft_rag")]
    assert answers["vllm"] == answers["transformers"]
