"""Model construction: the tiny model, `from_pretrained` on a local folder, LoRA wrapping."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ragft.config.schema import MethodConfig, ModelConfig
from ragft.errors import ConfigError
from ragft.model.build import load_model, materialize_tiny, module_names
from ragft.train.spec import validate_train


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from ragft.sample import sample_path

    model = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        vocab_size=512)
    cache = tmp_path_factory.mktemp("cache")
    return materialize_tiny(model, [sample_path("corpus.jsonl")], str(cache), seed=0,
                            dest=tmp_path_factory.mktemp("m") / "tiny")


def test_tiny_is_a_plain_hf_folder(tiny_folder):
    lm = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    assert lm.config.model_type == "llama" and lm.config.num_hidden_layers == 2
    assert lm.config.vocab_size == len(tok) == 512
    ids = tok("Hello", return_tensors="pt").input_ids
    out = lm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


def test_tiny_init_is_deterministic(tiny_folder, tmp_path):
    from ragft.sample import sample_path

    model = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        vocab_size=512)
    again = materialize_tiny(model, [sample_path("corpus.jsonl")], str(tmp_path / "c"), seed=0, dest=tmp_path / "t")
    a = AutoModelForCausalLM.from_pretrained(tiny_folder).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_wraps_only_target_modules(tiny_folder):
    method = MethodConfig(name="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    lm = load_model(str(tiny_folder), ModelConfig(source=str(tiny_folder)), method, torch.float32, use_cuda=False)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    # 2 layers × (q_proj: A 4×64 + B 64×4, v_proj: A 4×64 + B 32×4, as 2 KV heads × 16 dims)
    assert sum(p.numel() for n, p in lm.named_parameters() if n in trainable) == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))


def test_full_method_trains_every_weight(tiny_folder):
    lm = load_model(str(tiny_folder), ModelConfig(source=str(tiny_folder)), MethodConfig(name="full"),
                    torch.float32, use_cuda=False)
    assert all(p.requires_grad for p in lm.parameters())


def test_module_names_probe_without_weights(tiny_folder):
    names = module_names(str(tiny_folder), ModelConfig(source=str(tiny_folder)))
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


def test_local_model_config_validates_and_checks_targets(compose_train, tiny_folder):
    spec = validate_train(compose_train("model=local", f"model.source={tiny_folder}"))
    assert spec.model.source == str(tiny_folder)
    with pytest.raises(ConfigError) as info:
        validate_train(compose_train("model=local", f"model.source={tiny_folder}", "method.target_modules=[c_attn]"))
    assert "['c_attn'] not found" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        validate_train(compose_train("model=local", f"model.source={tiny_folder}/nope"))
    assert "cannot load its config" in info.value.problems[0]
