"""A `ragft export` folder served by vLLM as a plain model: the merged LoRA checkpoint, no adapter loaded.

Reference: peft's base + adapter in transformers (float32). vLLM (float32, eager) must decode the same greedy
tokens, and the log-probability it gives each chosen token must match transformers' within LOGPROB_TOL
(its CPU kernels sum in another order). The tiny base has widened argmax margins (helpers.serve_models), so
greedy tokens are stable across the two. vLLM runs in a subprocess: it binds the threads of the process it
runs in. Runs in `make test-vllm` (.venv-vllm); skipped where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from ragft.config.compose import compose_config  # noqa: E402
from ragft.export.spec import validate_export  # noqa: E402
from ragft.export.write import run_export  # noqa: E402

LOGPROB_TOL = 1e-4
PROMPTS = [[1, 280, 341, 997, 480, 1489], [1, 4, 205, 227, 519, 37, 6, 5], [1, 77, 12, 900]]
MAX_TOKENS = 8

VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, kv_cache_memory_bytes=2**30, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]), logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(sys.argv[2])], params)
    rows = [{"tokens": list(o.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
            for o in outputs]
    print("RESULT " + json.dumps(rows), flush=True)
"""


def peft_greedy(base, adapter, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from base + adapter through peft (float32)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            scores = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            token = int(scores.argmax())
            ids.append(token)
            logprobs.append(float(scores[token]))
    return ids[len(prompt):], logprobs


@pytest.mark.timeout(600)
def test_vllm_serves_the_merged_export_as_base_plus_adapter(serve_models, tmp_path):
    out = tmp_path / "merged"
    run_export(validate_export(compose_config("export", [f"checkpoint={serve_models.alpha}", f"out_dir={out}"])))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(out), json.dumps(PROMPTS), str(MAX_TOKENS)],
                         capture_output=True, text=True, env=env, timeout=540)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    for prompt, row in zip(PROMPTS, rows):
        tokens, logprobs = peft_greedy(serve_models.base, serve_models.alpha, prompt)
        assert row["tokens"] == tokens
        assert max(abs(a - b) for a, b in zip(row["logprobs"], logprobs)) <= LOGPROB_TOL
