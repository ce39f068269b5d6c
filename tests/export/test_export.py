"""`ragft export`: a LoRA checkpoint folded into its base and a full fine-tune, written as HF safetensors.

Reference: peft's own loader (`PeftModel.from_pretrained(base, checkpoint)`, adapter not merged) in float32;
the exported folder loaded in plain transformers must give the same logits within LOGIT_TOL (float32 sums in
another order once B·A is folded into W). The LoRA checkpoints are the serve tests' (tests/conftest.py:
random adapters with a ragft manifest); the full fine-tune is a perturbed copy of the base with one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.serve_models import build_full_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ragft.checkpoints import MANIFEST, sha256_file, verify
from ragft.config.compose import compose_config
from ragft.export.spec import validate_export
from ragft.export.write import run_export

LOGIT_TOL = 1e-4  # max |exported − base+adapter| in float32, on logits up to ~30 (the base's lm_head is scaled ×30)
TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 31, 12, 88, 140]])


def export(checkpoint: Path | str, out_dir: Path, *overrides: str):
    cfg = compose_config("export", [f"checkpoint={checkpoint}", f"out_dir={out_dir}", *overrides])
    return run_export(validate_export(cfg))


def ragft_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragft", "export", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.fixture(scope="module")
def lora_export(serve_models, tmp_path_factory) -> Path:
    """The alpha adapter exported through the real command line, as a user runs it."""
    out = tmp_path_factory.mktemp("export") / "merged"
    run = ragft_cli(f"checkpoint={serve_models.alpha}", f"out_dir={out}", cwd=out.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"ragft export: wrote {out}" in run.stdout
    return out


@pytest.fixture(scope="module")
def full_checkpoint(serve_models, tmp_path_factory) -> Path:
    folder = build_full_model(serve_models.base, tmp_path_factory.mktemp("full") / "ckpt", seed=3)
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"format": "ragft-checkpoint/1", "run_id": "run-full", "step": 30, "method": "full",
                "model": {"name": "tiny", "source": str(serve_models.base)}, "metrics": {}, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_the_merged_folder_is_a_plain_model_with_no_adapter_files(lora_export, serve_models):
    names = {p.name for p in lora_export.iterdir()}
    assert not {n for n in names if n.startswith("adapter_")}, names
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", MANIFEST} <= names
    weights = load_file(lora_export / "model.safetensors")
    assert not [k for k in weights if "lora" in k or "base_layer" in k]
    assert set(weights) == set(load_file(serve_models.base / "model.safetensors"))
    assert not list(lora_export.parent.glob(".tmp-export-*"))  # written aside, then renamed


def test_merged_logits_equal_base_plus_adapter_through_peft(lora_export, serve_models):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(serve_models.base, dtype=torch.float32)
    reference = logits(PeftModel.from_pretrained(base, serve_models.alpha).eval())
    merged = AutoModelForCausalLM.from_pretrained(lora_export).eval()
    exported = logits(merged)
    assert merged.dtype == torch.float32  # auto: the base's recorded dtype
    unadapted = logits(AutoModelForCausalLM.from_pretrained(serve_models.base, dtype=torch.float32))
    assert (reference - unadapted).abs().max() > 1.0  # the adapter changes the output: the comparison means something
    assert (exported - reference).abs().max().item() <= LOGIT_TOL


def test_the_export_manifest_checks_the_export_and_names_its_source(lora_export, serve_models):
    manifest = json.loads((lora_export / MANIFEST).read_text())
    assert verify(lora_export) == []
    assert set(manifest["files"]) == {str(p.relative_to(lora_export)) for p in lora_export.rglob("*")
                                      if p.is_file() and p.name != MANIFEST}
    source = manifest["source"]
    assert source["checkpoint"] == str(serve_models.alpha.resolve())
    assert source["manifest_sha256"] == sha256_file(serve_models.alpha / MANIFEST)
    assert (source["kind"], source["run_id"], source["step"], manifest["dtype"]) == ("lora", "run-alpha", 10, "float32")


def test_the_tokenizer_and_chat_template_are_the_checkpoints(lora_export, serve_models):
    messages = [{"role": "user", "content": "Who skippers the ferry Kinand?"}]
    ours, theirs = AutoTokenizer.from_pretrained(lora_export), AutoTokenizer.from_pretrained(serve_models.alpha)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True)


def test_a_full_fine_tune_exports_its_weights_in_the_dtype_asked(full_checkpoint, tmp_path):
    out = tmp_path / "full-bf16"
    exported = export(full_checkpoint, out, "export.dtype=bfloat16")
    assert exported.dtype == "bfloat16"
    weights, source = load_file(out / "model.safetensors"), load_file(full_checkpoint / "model.safetensors")
    assert set(weights) == set(source)
    assert all(weights[k].dtype == torch.bfloat16 and torch.equal(weights[k], source[k].to(torch.bfloat16))
               for k in source)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.use_cache
    assert json.loads((out / MANIFEST).read_text())["source"]["kind"] == "full"


def test_overwrite_replaces_a_non_empty_out_dir_whole(full_checkpoint, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "old.txt").write_text("an earlier export")
    export(full_checkpoint, out, "export.overwrite=true")
    assert not (out / "old.txt").exists() and verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # neither the temporary nor the old folder stays


def test_an_out_dir_filled_after_validation_is_left_alone(full_checkpoint, tmp_path):
    out = tmp_path / "raced"
    spec = validate_export(compose_config("export", [f"checkpoint={full_checkpoint}", f"out_dir={out}"]))
    out.mkdir()
    (out / "theirs.txt").write_text("written meanwhile")
    with pytest.raises(FileExistsError):
        run_export(spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raced"] and (out / "theirs.txt").is_file()


def test_checkpoint_latest_names_the_newest_checkpoint_of_the_runs(serve_models, tmp_path):
    import shutil

    newest = tmp_path / "train" / "run-alpha" / "checkpoints" / "10"
    shutil.copytree(serve_models.alpha, newest)
    export("latest", tmp_path / "out", f"train_runs_dir={tmp_path / 'train'}",
           f"registry.path={tmp_path / 'registry.jsonl'}")
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["source"]["checkpoint"] == str(newest)


def test_bad_input_exits_2_with_every_problem_listed(serve_models, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    run = ragft_cli(f"checkpoint={tmp_path / 'nowhere'}", f"out_dir={taken}", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "2 problem(s)" in run.stderr and "does not exist" in run.stderr and "export.overwrite=true" in run.stderr
    assert (taken / "x").read_text() == "x"


def test_a_model_that_is_no_checkpoint_or_an_out_dir_inside_the_checkpoint_is_refused(serve_models, tmp_path):
    from ragft.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate_export(compose_config("export", [f"checkpoint={serve_models.base}", f"out_dir={tmp_path / 'a'}"]))
    assert "not a ragft checkpoint" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate_export(compose_config("export", [f"checkpoint={serve_models.alpha}",
                                                  f"out_dir={serve_models.alpha / 'merged'}"]))
    assert "overlaps" in str(err.value)


# GGUF (export.format=gguf): read back through transformers' GGUF loader, which undoes the Q/K permutation and
# rebuilds the tokenizer from the file's metadata.

def test_a_gguf_export_reads_back_with_the_logits_and_tokenizer_of_base_plus_adapter(serve_models, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged-gguf"
    export(serve_models.alpha, out, "export.format=gguf")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "merged-gguf.gguf"] and verify(out) == []
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="merged-gguf.gguf", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(serve_models.base, dtype=torch.float32)
    reference = logits(PeftModel.from_pretrained(base, serve_models.alpha).eval())
    assert (logits(loaded) - reference).abs().max().item() <= LOGIT_TOL

    ours = AutoTokenizer.from_pretrained(out, gguf_file="merged-gguf.gguf")
    theirs = AutoTokenizer.from_pretrained(serve_models.alpha)
    for text in ("The ferry Kinand carries 105 passengers.", "  Two  spaces\n\nand lines ", "<|user|>\n Who?<|end|>"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who?"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_bf16_gguf_holds_the_weights_of_the_bf16_safetensors_export(full_checkpoint, tmp_path):
    export(full_checkpoint, tmp_path / "st", "export.dtype=bfloat16")
    export(full_checkpoint, tmp_path / "gg", "export.dtype=bfloat16", "export.format=gguf")
    safetensors = AutoModelForCausalLM.from_pretrained(tmp_path / "st").state_dict()
    gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "gg", gguf_file="gg.gguf", dtype=torch.float32).state_dict()
    assert set(gguf) == set(safetensors)
    assert all(torch.equal(gguf[k], safetensors[k].float()) for k in safetensors)


def test_gguf_refuses_what_its_writer_does_not_map(tmp_path):
    from ragft.export.spec import check_gguf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2",
                                                      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}, "pre_tokenizer": None}))
    problems = check_gguf(str(tmp_path), str(tmp_path))
    assert len(problems) == 3 and "qwen2" in problems[0] and "yarn" in problems[1] and "byte-level" in problems[2]
