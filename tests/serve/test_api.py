"""`ragft serve` over real HTTP on localhost, driven by the official `openai` client.

One app for the module on the shared local Ray: the tiny base with two LoRA checkpoints
(alpha, beta) sharing it, and a private copy of the sample index (live updates change it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import hypothesis
import openai
import pytest
import schemathesis

from helpers.net import free_port
from ragft.jsonl import read_rows
from ragft.sample import sample_path
from ragft.serve.keys import ADMIN_KEY_ENV, API_KEYS_ENV

pytestmark = pytest.mark.ray

USER_KEY, ADMIN_KEY = "user-key-0123456789abcdef", "admin-key-0123456789abcdef"
QA = read_rows(sample_path("qa.jsonl"))
QA_V2 = read_rows(sample_path("qa_v2.jsonl"))


def _jsonl(name: str) -> dict[str, dict]:
    return {d["id"]: d for d in read_rows(sample_path(name))}


CORPUS, CORPUS_V2 = _jsonl("corpus.jsonl"), _jsonl("corpus_v2.jsonl")


@dataclass
class Server:
    url: str  # http://127.0.0.1:<port>/v1
    out_dir: Path
    index: Path

    def client(self, key: str | None = USER_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or "", max_retries=0, timeout=60)

    def http(self, method: str, path: str, key: str | None = USER_KEY, headers_extra: dict | None = None,
             **kw) -> httpx.Response:
        headers = {**({"authorization": f"Bearer {key}"} if key else {}), **(headers_extra or {})}
        return httpx.request(method, self.url.removesuffix("/v1") + path, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def server(ray_cluster, serve_models, sample_index, compose_serve, tmp_path_factory):
    from ray import serve

    from ragft.serve.run import run_serve
    from ragft.serve.spec import validate_serve

    tmp = tmp_path_factory.mktemp("serve")
    index = tmp / "index"
    shutil.copytree(sample_index, index)
    port = free_port()
    patch = pytest.MonkeyPatch()
    patch.setenv(API_KEYS_ENV, USER_KEY)
    patch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    cfg = compose_serve(f"checkpoint={serve_models.alpha}", "serve.name=alpha",
                        f"+serve.adapters.beta={serve_models.beta}", f"index.path={index}", f"serve.port={port}",
                        f"out_dir={tmp / 'run'}", "serve.retriever.max_replicas=1", "serve.generator.num_cpus=0.5",
                        "serve.retriever.num_cpus=0.5")
    try:
        info = run_serve(validate_serve(cfg), wait=False)
        yield Server(info["url"], tmp / "run", index)
    finally:
        serve.shutdown()
        patch.undo()


def ask(client: openai.OpenAI, question: str, model: str = "alpha", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=kw.pop("max_tokens", 12), temperature=kw.pop("temperature", 0),
                                          **kw)


def check_citations(citations: list[dict], corpus: dict[str, dict]) -> None:
    """Every citation quotes the cited document at the cited offsets."""
    assert citations
    for c in citations:
        text = corpus[c["doc_id"]]["text"]
        assert text[c["start"]:c["start"] + len(c["quote"])] == c["quote"], c
        assert text[c["start"]:c["end"]].startswith(c["quote"]) and c["end"] > c["start"]


def test_models_lists_base_and_both_adapters(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"base", "alpha", "beta"}
    assert models["alpha"].run_id == "run-alpha" and models["beta"].run_id == "run-beta"
    assert models["alpha"].parent == "base" and models["base"].kind == "base"
    assert Path(models["beta"].checkpoint).name == "beta"
    assert all(m.index_version == 1 for m in models.values())


def test_chat_cites_the_corpus(server):
    qa = QA[0]
    response = ask(server.client(), qa["question"])
    choice = response.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens >= 1 and response.model == "alpha"
    citations = response.citations
    check_citations(citations, CORPUS)
    assert qa["doc_ids"][0] in {c["doc_id"] for c in citations}  # the gold document was retrieved
    assert [c["n"] for c in citations] == [1, 2, 3, 4] and response.index_version == 1


def test_eval_prompt_and_answer_equal_serve_for_the_same_question(server, serve_models, sample_index, tmp_path):
    """`ragft eval` and `ragft serve` build the same prompt from the same hits and answer it the same way:
    same cited chunks, same prompt token count, same greedy text (the server's index is still version 1,
    identical to sample_index, before the live-update test below changes it)."""
    from ragft.config.compose import compose_config
    from ragft.eval.run import run_eval
    from ragft.eval.spec import validate_eval

    n = 6
    cfg = compose_config("eval", [f"checkpoint={serve_models.alpha}", f"index.path={sample_index}",
                                  f"out_dir={tmp_path / 'eval'}", f"registry.path={tmp_path / 'registry.jsonl'}",
                                  f"eval.max_questions={n}", "eval.systems=[ft_rag]", "eval.max_tokens=12",
                                  "eval.num_workers=1", "eval.perplexity=false"])
    scored = run_eval(validate_eval(cfg), progress=lambda line: None)["questions"]
    client = server.client()
    for q in scored:
        served = ask(client, q["question"], max_tokens=12)
        assert [c["doc_id"] for c in served.citations] == q["retrieved_doc_ids"]
        assert served.choices[0].message.content.strip() == q["answers"]["ft_rag"]["text"]
        assert served.usage.completion_tokens == q["answers"]["ft_rag"]["tokens"]
        assert served.usage.prompt_tokens == q["answers"]["ft_rag"]["prompt_tokens"]


def test_stream_equals_non_stream_and_carries_citations(server):
    client, question = server.client(), QA[1]["question"]
    whole = ask(client, question, max_tokens=16)
    chunks = list(ask(client, question, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].citations == whole.citations
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_and_without_retrieval(server):
    client, prompt = server.client(), "The home port of the Fousond is"
    plain = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0)
    assert plain.citations == [] and isinstance(plain.choices[0].text, str)
    rag = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"rag": {"enabled": True, "k": 2}})
    check_citations(rag.citations, CORPUS)
    assert len(rag.citations) == 2 and rag.usage.prompt_tokens > plain.usage.prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_rag_can_be_turned_off_per_request(server):
    response = ask(server.client(), QA[2]["question"], extra_body={"rag": {"enabled": False}})
    with_rag = ask(server.client(), QA[2]["question"])
    assert response.citations == [] and response.index_version is None
    assert response.usage.prompt_tokens < with_rag.usage.prompt_tokens


def test_adapters_share_a_base_and_differ(server):
    client, question = server.client(), QA[3]["question"]
    outputs = {m: ask(client, question, model=m, max_tokens=16).choices[0].message.content
               for m in ("base", "alpha", "beta")}
    assert len(set(outputs.values())) == 3, outputs
    assert ask(client, question, model="beta", max_tokens=16).choices[0].message.content == outputs["beta"]


def test_sampling_is_seeded(server):
    client, question = server.client(), QA[4]["question"]
    a, b, c = (ask(client, question, temperature=1.0, top_p=0.9, seed=s, max_tokens=16).choices[0].message.content
               for s in (7, 7, 8))
    assert a == b and a != c
    full = ask(client, question, max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a string the greedy output is known to reach
    stopped = ask(client, question, max_tokens=16, stop=[stop]).choices[0]
    assert stopped.message.content == full[:full.index(stop)] and stopped.finish_reason == "stop"


def test_live_update_changes_the_next_citation(server):
    changed = next(q for q in QA if q["changed"])
    doc_id = changed["doc_ids"][0]
    client = server.client()
    before = ask(client, changed["question"])
    cited = [c for c in before.citations if c["doc_id"] == doc_id]
    assert cited and before.index_version == 1
    check_citations(before.citations, CORPUS)

    new_doc = {k: v for k, v in CORPUS_V2[doc_id].items() if k in ("id", "text", "title", "source")}
    assert server.http("POST", "/v1/index/documents", key=None, json={"documents": [new_doc]}).status_code == 401
    forbidden = server.http("POST", "/v1/index/documents", key=USER_KEY, json={"documents": [new_doc]})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "insufficient_permissions"
    update = server.http("POST", "/v1/index/documents", key=ADMIN_KEY, json={"documents": [new_doc]})
    assert update.status_code == 200, update.text
    assert update.json()["version"] == 2 and update.json()["changed"] == 1 and update.json()["reused_chunks"] > 0

    after = ask(client, changed["question"])  # no restart: the next request already sees version 2
    assert after.index_version == 2
    now_cited = [c for c in after.citations if c["doc_id"] == doc_id]
    assert now_cited
    check_citations(now_cited, CORPUS_V2)
    # the cited chunk now holds the updated fact, where before it held the old one
    new_answer = next(q["answer"] for q in QA_V2 if q["id"] == changed["id"])
    assert any(changed["answer"] in CORPUS[doc_id]["text"][c["start"]:c["end"]] for c in cited)
    assert any(new_answer in CORPUS_V2[doc_id]["text"][c["start"]:c["end"]] for c in now_cited)

    deleted = server.http("DELETE", f"/v1/index/documents/{doc_id}", key=ADMIN_KEY)
    assert deleted.status_code == 200 and deleted.json()["version"] == 3
    gone = ask(client, changed["question"])
    assert gone.index_version == 3 and doc_id not in {c["doc_id"] for c in gone.citations}
    again = server.http("DELETE", f"/v1/index/documents/{doc_id}", key=ADMIN_KEY)
    assert again.status_code == 404 and again.json()["error"]["code"] == "document_not_found"


def test_update_while_requests_are_in_flight_drops_none(server):
    """Requests running while a new index version is published finish, on the old or the new version."""
    doc = next(d for d in CORPUS_V2.values() if d["id"] != "ferry-0001")
    before = server.client().models.list().data[0].index_version

    async def requests_and_an_update():
        client = openai.AsyncOpenAI(base_url=server.url, api_key=USER_KEY, max_retries=0, timeout=120)
        asks = [client.chat.completions.create(model="alpha", max_tokens=8,
                                               messages=[{"role": "user", "content": QA[i]["question"]}])
                for i in range(16)]
        update = asyncio.to_thread(server.http, "POST", "/v1/index/documents", ADMIN_KEY,
                                   json={"documents": [{"id": doc["id"], "text": doc["text"] + " Updated."}]})
        return await asyncio.gather(*asks[:8], update, *asks[8:])

    results = asyncio.run(requests_and_an_update())
    update = results.pop(8)
    assert update.status_code == 200 and update.json()["version"] == before + 1
    assert {r.index_version for r in results} <= {before, before + 1}
    assert all(r.choices[0].finish_reason in ("stop", "length") and r.citations for r in results)


def test_adapter_loads_and_unloads_while_16_streams_run(server, serve_models, tmp_path):
    """POST /v1/adapters while 16 streams decode: they all finish with 200, the new name answers (as the adapter
    it was copied from does) and is listed; after DELETE it is gone (404); only the admin key loads."""
    gamma = tmp_path / "gamma"
    shutil.copytree(serve_models.beta, gamma)  # its manifest's sha256 sums still hold
    load = {"name": "gamma", "checkpoint": str(gamma)}
    assert server.http("POST", "/v1/adapters", USER_KEY, json=load).status_code == 403
    assert server.http("POST", "/v1/adapters", None, json=load).status_code == 401
    assert server.http("POST", "/v1/adapters", ADMIN_KEY, json={**load, "lora_rank": 8}).json()["error"]["code"] \
        == "unsupported_parameter"
    times = {}

    async def stream(client: openai.AsyncOpenAI, i: int) -> str:
        chunks = await client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": QA[i]["question"]}], max_tokens=48, stream=True,
            temperature=0.8, seed=i, extra_body={"rag": {"enabled": False}})
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        times[i] = time.perf_counter()
        return text

    async def streams_and_a_load():
        client = openai.AsyncOpenAI(base_url=server.url, api_key=USER_KEY, max_retries=0, timeout=120)
        streams = [asyncio.create_task(stream(client, i)) for i in range(16)]
        await asyncio.sleep(0.5)
        sent = time.perf_counter()
        loaded = await asyncio.to_thread(server.http, "POST", "/v1/adapters", ADMIN_KEY, json=load)
        return sent, loaded, await asyncio.gather(*streams)

    sent, loaded, texts = asyncio.run(streams_and_a_load())
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["replicas"] == 1 and loaded.json()["run_id"] == "run-beta"
    assert len(texts) == 16 and all(isinstance(t, str) for t in texts)  # every stream ended with [DONE]
    assert any(t > sent for t in times.values()), "no stream was still running when the load was sent"
    client = server.client()
    listed = {m.id: m for m in client.models.list().data}
    assert listed["gamma"].runtime and listed["gamma"].parent == "base" and "runtime" not in listed["beta"].model_extra
    question = QA[1]["question"]
    assert ask(client, question, model="gamma").choices[0].message.content \
        == ask(client, question, model="beta").choices[0].message.content
    assert server.http("DELETE", "/v1/adapters/gamma", USER_KEY).status_code == 403
    assert server.http("DELETE", "/v1/adapters/beta", ADMIN_KEY).status_code == 409  # served since start-up
    assert server.http("DELETE", "/v1/adapters/gamma", ADMIN_KEY).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        ask(client, question, model="gamma")
    assert "gamma" not in {m.id for m in client.models.list().data}
    assert server.http("DELETE", "/v1/adapters/gamma", ADMIN_KEY).status_code == 404


@pytest.mark.parametrize("checkpoint, status, code", [
    ("/no/such/folder", 404, "checkpoint_not_found"),
    ("base", 422, "checkpoint_unverified"),  # a model folder without a manifest
    ("damaged", 422, "checkpoint_invalid"),
    ("other-base", 422, "base_model_mismatch"),
])
def test_adapter_load_refuses_what_it_cannot_serve(server, serve_models, tmp_path, checkpoint, status, code):
    if checkpoint == "base":
        checkpoint = str(serve_models.base)
    elif checkpoint == "damaged":
        shutil.copytree(serve_models.beta, tmp_path / "damaged")
        (tmp_path / "damaged" / "adapter_config.json").write_text("{}")
        checkpoint = str(tmp_path / "damaged")
    elif checkpoint == "other-base":
        other = tmp_path / "other"
        shutil.copytree(serve_models.beta, other / "adapter")
        config = json.loads((serve_models.base / "config.json").read_text())
        (other / "base").mkdir()
        (other / "base" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
        manifest = json.loads((other / "adapter" / "manifest.json").read_text())
        manifest["model"] = {**manifest.get("model", {}), "source": str(other / "base")}
        (other / "adapter" / "manifest.json").write_text(json.dumps(manifest))
        checkpoint = str(other / "adapter")
    response = server.http("POST", "/v1/adapters", ADMIN_KEY, json={"name": "refused", "checkpoint": checkpoint})
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text


def test_missing_or_wrong_key_is_401(server):
    with pytest.raises(openai.AuthenticationError) as err:
        ask(server.client("wrong-key-0123456789abcdef"), "hello")
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    for key in (None, "wrong-key-0123456789abcdef"):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("POST", "/v1/index/documents"), ("DELETE", "/v1/index/documents/ferry-0001")):
            response = server.http(method, path, key=key, content=b"not even json")
            assert response.status_code == 401, (method, path, key)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert server.http("GET", "/health", key=None).json()["status"] == "ok"  # health needs no key


LONG = "ferry " * 3000  # far beyond the tiny model's 1024-token context
BAD_REQUESTS = [
    # (name, method, path, body (bytes: sent raw), status, param, code)
    ("malformed json", "POST", "/v1/chat/completions", b'{"model": "alpha", "messages": [', 400, None,
     "invalid_json"),
    ("body not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("no messages", "POST", "/v1/chat/completions", {"model": "alpha"}, 400, "messages",
     "missing_required_parameter"),
    ("empty messages", "POST", "/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "messages",
     "invalid_value"),
    ("unknown role", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ("unknown model", "POST", "/v1/chat/completions",
     {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ("model escaping the folder", "POST", "/v1/chat/completions",
     {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("max_tokens 0", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens",
     "invalid_value"),
    ("max_tokens too large", "POST", "/v1/completions",
     {"model": "alpha", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens", "invalid_value"),
    ("prompt longer than the context", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("prompt + max_tokens over the context", "POST", "/v1/completions",
     {"model": "alpha", "prompt": "ferry " * 700, "max_tokens": 1000}, 400, "prompt", "context_length_exceeded"),
    ("temperature out of range", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature",
     "invalid_value"),
    ("too many stop strings", "POST", "/v1/completions",
     {"model": "alpha", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("n too large", "POST", "/v1/completions", {"model": "alpha", "prompt": "hi", "n": 100}, 400, "n",
     "invalid_value"),
    ("rag.k too large", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "rag": {"k": 1000}}, 400, "rag.k",
     "invalid_value"),
    ("unknown rag option", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "rag": {"depth": 3}}, 400, "rag.depth",
     "unsupported_parameter"),
    # OpenAI parameters ragft does not implement are refused, never dropped
    ("tools", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ("response_format", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format", "unsupported_parameter"),
    ("logprobs with stream", "POST", "/v1/completions",
     {"model": "alpha", "prompt": "hi", "logprobs": 1, "stream": True}, 400, "logprobs", "unsupported_parameter"),
    ("logprobs=0 with stream", "POST", "/v1/completions",
     {"model": "alpha", "prompt": "hi", "logprobs": 0, "stream": True}, 400, "logprobs", "unsupported_parameter"),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs",
     "invalid_value"),
    ("too many top_logprobs", "POST", "/v1/completions", {"model": "alpha", "prompt": "hi", "logprobs": 21}, 400,
     "logprobs", "invalid_value"),
    ("max_tokens 0 without echo", "POST", "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 0},
     400, "max_tokens", "invalid_value"),
    ("token id beyond the vocabulary", "POST", "/v1/completions", {"model": "alpha", "prompt": [5, 10**9]}, 400,
     "prompt", "invalid_value"),
    ("negative token id", "POST", "/v1/completions", {"model": "alpha", "prompt": [[5, -1]]}, 400, "prompt.0.1",
     "invalid_value"),
    ("empty token list", "POST", "/v1/completions", {"model": "alpha", "prompt": [[]]}, 400, "prompt.0",
     "invalid_value"),
    ("token prompt with retrieval", "POST", "/v1/completions",
     {"model": "alpha", "prompt": [5, 6], "rag": {"enabled": True}}, 400, "rag", "invalid_value"),
    ("two prompts with retrieval", "POST", "/v1/completions",
     {"model": "alpha", "prompt": ["a", "b"], "rag": {"enabled": True}}, 400, "rag", "invalid_value"),
    ("too many prompts", "POST", "/v1/completions", {"model": "alpha", "prompt": ["a"] * 33}, 400, "prompt",
     "invalid_value"),
    ("presence_penalty", "POST", "/v1/completions", {"model": "alpha", "prompt": "hi", "presence_penalty": 0.5},
     400, "presence_penalty", "unsupported_parameter"),
    ("prompt of wrong type", "POST", "/v1/completions", {"model": "alpha", "prompt": 42}, 400, "prompt",
     "invalid_value"),
    ("bad document row", "POST", "/v1/index/documents", {"documents": [{"id": "x"}]}, 400, "documents.0",
     "invalid_value"),
    ("duplicate document ids", "POST", "/v1/index/documents",
     {"documents": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}, 400, "documents.1.id", "invalid_value"),
    ("stop string too long", "POST", "/v1/completions", {"model": "alpha", "prompt": "hi", "stop": "x" * 257}, 400,
     "stop", "invalid_value"),
    ("seed beyond int64", "POST", "/v1/completions", {"model": "alpha", "prompt": "hi", "seed": 2**63}, 400, "seed",
     "invalid_value"),
    ("prompts x n over max_sequences", "POST", "/v1/completions", {"model": "alpha", "prompt": ["a"] * 32, "n": 4},
     400, "n", "invalid_value"),
    ("prompt over max_prompt_chars", "POST", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": "a" * 200_001}]}, 400, "messages",
     "context_length_exceeded"),
    ("unknown route", "GET", "/v1/engines", None, 404, None, "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, None, "method_not_allowed"),
]


@pytest.mark.parametrize("name,method,path,body,status,param,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_a_4xx_in_openai_shape(server, name, method, path, body, status, param, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    key = ADMIN_KEY if "index" in path else USER_KEY
    response = server.http(method, path, key=key, **kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error


def test_unbounded_input_is_refused_within_seconds_and_health_stays_up(server):
    """Requests built to exhaust the server get a 4xx in OpenAI's shape, fast, and nobody else notices."""
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    cases = [  # (name, body bytes, route, key, status, code)
        ("32 MB body", json.dumps({**chat, "messages": [{"role": "user", "content": "a" * (32 << 20)}]}).encode(),
         "/v1/chat/completions", USER_KEY, 413, "request_too_large"),
        ("32 MB of documents", json.dumps({"documents": [{"id": "x", "text": "a" * (32 << 20)}]}).encode(),
         "/v1/index/documents", ADMIN_KEY, 413, "request_too_large"),
        ("seed 2**70", json.dumps({**chat, "seed": 2**70}).encode(), "/v1/chat/completions", USER_KEY, 400,
         "invalid_value"),
        ("20,000-character stop", json.dumps({**chat, "stop": "x" * 20_000}).encode(), "/v1/chat/completions",
         USER_KEY, 400, "invalid_value"),
        ("10,000 prompts x n 10,000", json.dumps({"model": "alpha", "prompt": ["a"] * 10_000, "n": 10_000}).encode(),
         "/v1/completions", USER_KEY, 400, "invalid_value"),
    ]
    for name, body, path, key, status, code in cases:
        started = time.perf_counter()
        response = server.http("POST", path, key=key, content=body, headers_extra={"content-type": "application/json"})
        seconds = time.perf_counter() - started
        error = response.json()["error"]
        assert (response.status_code, error["code"]) == (status, code), (name, response.text[:300])
        assert set(error) == {"message", "type", "param", "code"}
        assert seconds < 10, (name, seconds)
        print(f"\n{name}: {response.status_code} in {seconds:.2f} s")
        assert server.http("GET", "/health", key=None).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server):
    def chunks():
        yield b'{"model": "alpha", "prompt": "'
        for _ in range(8):
            yield b"a" * (1 << 20)  # no Content-Length: the server counts as it reads
        yield b'"}'

    response = server.http("POST", "/v1/completions", content=chunks())
    assert (response.status_code, response.json()["error"]["code"]) == (413, "request_too_large")


def test_echo_logprobs_score_token_prompts_as_lm_eval_asks(server):
    """What lm-eval's local-completions sends for a multiple-choice question: token ids, echo, logprobs=1,
    max_tokens=1, several prompts at once. The greedy token's logprob is the top one; batching changes nothing."""
    client = server.client()
    prompts = [[5, 17, 40, 9, 33], [7, 8, 9]]
    kw = dict(model="alpha", echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    both = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.usage.prompt_tokens == 8 and both.usage.completion_tokens == 2
    for prompt, choice in zip(prompts, both.choices):
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
        assert all(x < 0 for x in lp.token_logprobs[1:]) and all(len(t) == 1 for t in lp.top_logprobs[1:])
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: the sampled token is the top
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        alone = client.completions.create(prompt=prompt, **kw).choices[0].logprobs
        assert alone.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    scored = client.completions.create(prompt=prompts[0], **{**kw, "max_tokens": 0})  # older clients: the prompt alone
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        both.choices[0].logprobs.token_logprobs[1:-1], abs=1e-5)
    assert scored.usage.completion_tokens == 0


def test_logprobs_of_completions_and_chat(server):
    client = server.client()
    completion = client.completions.create(model="beta", prompt="The ferry", max_tokens=6, temperature=0,
                                           logprobs=3)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == completion.usage.completion_tokens  # an end-of-sequence token included
    assert all(x == max(top.values()) and len(top) <= 3 for x, top in zip(lp.token_logprobs, lp.top_logprobs))
    chat = ask(client, QA[0]["question"], model="beta", max_tokens=6, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob for t in content)
    assert len(content) == chat.usage.completion_tokens
    assert all(bytes(t.bytes) == t.token.encode() for t in content)
    plain = ask(client, QA[0]["question"], model="beta", max_tokens=6)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


def test_the_openai_client_raises_the_matching_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        ask(client, "hi", model="nope")
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, LONG)
    assert err.value.code == "context_length_exceeded"


def test_32_concurrent_requests(server):
    async def one(client: openai.AsyncOpenAI, i: int):
        model = ("alpha", "beta", "base")[i % 3]
        kwargs = dict(model=model, messages=[{"role": "user", "content": QA[i]["question"]}], max_tokens=12,
                      temperature=0 if i % 2 else 0.8, seed=i)
        if i % 4 == 0:
            stream = await client.chat.completions.create(stream=True, **kwargs)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        response = await client.chat.completions.create(**kwargs)
        assert response.citations
        return response.choices[0].message.content

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=server.url, api_key=USER_KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    started = time.perf_counter()
    texts = asyncio.run(all_of_them())
    assert len(texts) == 32 and all(isinstance(t, str) for t in texts)
    print(f"32 concurrent requests in {time.perf_counter() - started:.1f} s")


def test_access_log_has_a_line_per_request_and_no_secrets(server):
    question = QA[5]["question"]
    ask(server.client(), question)
    log = (server.out_dir / "access.log").read_text()
    lines = [json.loads(line) for line in log.splitlines()]
    assert lines[-1]["path"] == "/v1/chat/completions" and lines[-1]["status"] == 200
    assert lines[-1]["completion_tokens"] >= 1 and lines[-1]["citations"] == 4 and lines[-1]["retrieval_ms"] > 0
    assert {"/v1/models", "/v1/index/documents"} <= {line["path"] for line in lines}
    assert {401, 403, 404} <= {line["status"] for line in lines}
    assert question not in log and USER_KEY not in log and ADMIN_KEY not in log


def test_prometheus_metrics(server):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 60
    while True:  # Ray's metrics agent exports on its own period
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "ragft_requests" in text and "ragft_generated_tokens" in text:
            break
        assert time.monotonic() < deadline, "ragft metrics never appeared on Ray's Prometheus endpoint"
        time.sleep(2)
    assert "ragft_request_latency_ms_bucket" in text and "ragft_retrieval_ms" in text


def test_openapi_document_describes_the_request_bodies(server):
    """/openapi.json is served (no key needed: the schema is not a secret), and its request schemas are the
    ones the server validates with: what it declares is accepted, anything else is refused."""
    from ragft.serve.protocol import ChatRequest

    document = server.http("GET", "/openapi.json", key=None).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(document["paths"])
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == set(ChatRequest.model_fields)
    assert body["additionalProperties"] is False and body["required"] == ["model", "messages"]
    for name in ("Message", "RagOptions", "StreamOptions"):
        assert name in document["components"]["schemas"], name


# (method, path, generation modes): "negative" needs something in the schema to break (a body or a parameter)
FUZZED = [("GET", "/health", "positive"), ("GET", "/v1/models", "positive"), ("POST", "/v1/index/documents", "positive"),
          ("DELETE", "/v1/index/documents/{doc_id}", "positive"), ("POST", "/v1/chat/completions", "positive"),
          ("POST", "/v1/chat/completions", "negative"), ("POST", "/v1/completions", "positive"),
          ("POST", "/v1/completions", "negative")]


@pytest.mark.parametrize("method, path, mode", FUZZED, ids=[" ".join(f) for f in FUZZED])
def test_fuzzed_requests_get_no_5xx_and_errors_in_openai_shape(server, method, path, mode):
    """schemathesis generates requests from /openapi.json, valid ones (positive) and ones that break the schema
    (negative), for every route. With the user key the admin routes answer 403, so the fuzz never changes the
    index the tests above read."""
    from schemathesis import GenerationMode

    root = server.url.removesuffix("/v1")
    operation = schemathesis.openapi.from_url(root + "/openapi.json")[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    seen = []

    @hypothesis.given(case=strategy)
    @hypothesis.settings(max_examples=40 if method == "POST" else 10, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
    def check(case):
        if mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "alpha"  # a made-up model id is a 404 before anything else is looked at
        response = case.call(base_url=root, headers={"authorization": f"Bearer {USER_KEY}"}, timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

    check()
    assert seen
    print(f"\nschemathesis {method} {path} {mode}: {len(seen)} requests, status codes {sorted(Counter(seen).items())}")


def test_promotion_is_gated_by_eval_reports_and_recorded(server, serve_models, tmp_path, capsys, monkeypatch):
    """`ragft serve promote` against the running server: accepted when nothing serves under the name, refused
    (exit 2, nothing loaded) when the candidate's eval report does not beat the serving one by min_delta,
    accepted when it does, and --force skips the gate; the registry records what serves as the name."""
    from ragft import registry
    from ragft.cli import promote_command

    reg = tmp_path / "registry.jsonl"

    def candidate(name: str, f1: float) -> Path:
        folder = tmp_path / name
        shutil.copytree(serve_models.beta, folder)
        report = tmp_path / f"{name}.report.json"  # what ragft eval writes, cut to the metrics
        report.write_text(json.dumps({"metrics": {"all": {"ft_rag": {"token_f1": f1, "exact_match": 0.0}}},
                                      "split_sizes": {"all": 12}}))
        registry.record(reg, folder, metrics={"ft_rag.token_f1": f1}, links={"report_json": str(report)})
        return folder

    good, worse, better = candidate("good", 0.40), candidate("worse", 0.38), candidate("better", 0.50)
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    url = server.url.removesuffix("/v1")

    def promote(folder: Path, *extra: str, name: str = "promoted") -> tuple[int, str]:
        code = promote_command([f"checkpoint={folder}", f"serve.url={url}", f"as={name}", f"registry.path={reg}",
                                "promote.min_delta=0.05", *extra])
        out = capsys.readouterr()
        with capsys.disabled():  # the transcript, for whoever runs it with -s
            print(f"$ ragft serve promote checkpoint={folder.name} as={name} {' '.join(extra)}\n{out.out}{out.err}"
                  f"exit {code}")
        return code, out.out + out.err

    def serving() -> str:
        return next(m.checkpoint for m in server.client().models.list().data if m.id == "promoted")

    try:
        code, said = promote(good)
        assert code == 0 and "nothing serves as promoted yet" in said and serving() == str(good)
        code, said = promote(worse)
        assert code == 2 and "refused" in said and "does not beat" in said and serving() == str(good)
        code, said = promote(better)
        assert code == 0 and "beats" in said and serving() == str(better)
        code, said = promote(worse, "--force")
        assert code == 0 and "--force: the gate on ft_rag.token_f1 was skipped" in said and serving() == str(worse)
        now = registry.serving(reg, url)["promoted"]
        assert now["checkpoint"] == str(worse) and now["forced"] and now["replaced"] == str(better)
        assert now["since"] <= time.time()
        code, said = promote(better, name="base")
        assert code == 2 and "served since the server started" in said
    finally:
        server.http("DELETE", "/v1/adapters/promoted", ADMIN_KEY)
