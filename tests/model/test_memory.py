"""The memory plan (ragft.model.memory) from a config.json alone, against the references it can be held to.

- Shapes: the parameter count, the largest module and the LoRA parameter count of a config.json agree with the
  model transformers builds from that file on the meta device (and with peft's count of trainable parameters).
- Model states: DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs_all_cold`,
  `estimate_zero3_model_states_mem_needs_all_cold`, which print per-GPU GiB) for Llama-3-8B on 8 GPUs and
  Llama-3-70B on 4 × 8. ZeRO-2 (with and without optimizer offload) and ZeRO-3 with everything offloaded agree
  to their printed precision. ZeRO-3 without offload is within 12%: DeepSpeed counts 18 bytes per parameter
  over the GPUs, the plan 16 (ZeRO paper) plus the fp32 gradient of one optimizer sub-group (at most 1e9
  elements), which is what stage3.py allocates.
- Validation: Llama-3-8B full fine-tuning with strategy=ddp on 8 × 80 GB is refused by the real CLI with exit 2,
  naming the 128.5 GB of weights + gradients + Adam per GPU; strategy=zero3 validates and its Slurm dry run
  renders; the 70B / 72B recipes fit on 4 × 8 H100 with LoRA on ZeRO-3 (and FSDP2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ragft.errors import ConfigError
from ragft.model.memory import (GB, SHIPPED_CONFIGS, ServeSetup, Shape, TrainSetup, find_config, serve_plan,
                                shape_from_source, train_plan)
from ragft.train.spec import validate_train

LLAMA3_8B, LLAMA3_70B = "meta-llama--Meta-Llama-3-8B", "meta-llama--Meta-Llama-3-70B"
MODEL_STATES = ("weights", "gradients", "optimizer states", "fp32 gradients", "gathered layer")
GIB = 2**30


def shape(name: str) -> Shape:
    return Shape.from_config(json.loads((SHIPPED_CONFIGS / name / "config.json").read_text()))


@pytest.mark.parametrize("name", [LLAMA3_8B, "Qwen--Qwen2.5-7B-Instruct"])
def test_shape_counts_what_transformers_builds_from_the_config(name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SHIPPED_CONFIGS / name))
    s = shape(name)
    assert s.params == sum(p.numel() for p in lm.parameters())
    # DeepSpeed's model_to_params: the most parameters one module holds itself
    assert s.largest_module_params == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in lm.modules())
    targets = TrainSetup().lora_targets
    peft = get_peft_model(lm, LoraConfig(r=16, target_modules=list(targets)))
    assert s.lora_params(16, targets) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_published_sizes():
    assert [round(shape(n).params / 1e9, 2) for n in (LLAMA3_8B, LLAMA3_70B, "Qwen--Qwen2.5-72B-Instruct")] == [
        8.03, 70.55, 72.71]


def deepspeed_gib(estimate, offload_optimizer: bool, offload_param: bool | None = None, **kwargs) -> float:
    """The per-GPU GiB DeepSpeed's `*_all_cold` estimator prints on the row with these offload options (ZeRO-3:
    zero_init=1)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate(**kwargs)
    for line in out.getvalue().splitlines():
        if "|" not in line or "Options" in line:
            continue
        _, per_gpu, options = (part.strip() for part in line.split("|"))
        flags = dict(option.split("=") for option in options.split(", "))
        offloaded = {key: value.strip() != "none" for key, value in flags.items() if key.startswith("offload")}
        if offloaded["offload_optimizer"] == offload_optimizer and offloaded.get("offload_param") == offload_param \
                and flags.get("zero_init", "1") == "1":
            return float(per_gpu.removesuffix("GB"))
    raise AssertionError(f"no such row in:\n{out.getvalue()}")


def model_states_gib(name: str, gpus: int, **strategy) -> float:
    plan = train_plan(shape(name), TrainSetup(gpus=gpus, **strategy), 80)
    return plan.gb(*MODEL_STATES) * GB / GIB


@pytest.mark.parametrize("name, nodes", [(LLAMA3_8B, 1), (LLAMA3_70B, 4)])
def test_model_states_against_deepspeeds_estimators(name, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    s, gpus = shape(name), 8 * nodes
    zero2 = dict(total_params=s.params, num_gpus_per_node=8, num_nodes=nodes)
    zero3 = dict(zero2, largest_layer_params=s.largest_module_params)
    e2 = estimate_zero2_model_states_mem_needs_all_cold
    e3 = estimate_zero3_model_states_mem_needs_all_cold
    assert model_states_gib(name, gpus, zero_stage=2) == pytest.approx(deepspeed_gib(e2, False, **zero2), abs=0.006)
    assert model_states_gib(name, gpus, zero_stage=2, offload_optimizer=True) == pytest.approx(
        deepspeed_gib(e2, True, **zero2), abs=0.006)
    assert model_states_gib(name, gpus, zero_stage=3, offload_optimizer=True, offload_params=True) == pytest.approx(
        deepspeed_gib(e3, True, True, **zero3), abs=0.006)
    assert model_states_gib(name, gpus, zero_stage=3, offload_optimizer=True) == pytest.approx(
        deepspeed_gib(e3, True, False, **zero3), abs=0.006)
    assert model_states_gib(name, gpus, zero_stage=3) == pytest.approx(deepspeed_gib(e3, False, False, **zero3),
                                                                       rel=0.12)


def test_checkpointing_and_micro_batch_scale_activations_as_the_formula_says():
    s = shape(LLAMA3_8B)
    base = TrainSetup(gpus=8, zero_stage=3, micro_batch_size=2, seq_len=4096)
    plain, half = train_plan(s, base, 80), train_plan(s, replace(base, micro_batch_size=1), 80)
    checkpointed = train_plan(s, replace(base, checkpointing=True), 80)
    # per token and layer 2 norms × (4 + 2)h + 2 × (2h + 2q + 2kv + 4f) bytes (bf16): 49h for Llama-3-8B
    assert s.activation_bytes_per_token(2) == 49 * s.hidden_size
    assert plain.gb("activations") == pytest.approx(2 * 4096 * (32 * 49 + 8) * 4096 / GB)
    assert half.gb("activations", "logits") == pytest.approx(plain.gb("activations", "logits") / 2)
    assert checkpointed.gb("activations") < plain.gb("activations") / 10
    # peft drops out each adapter's input separately: its bf16 copy and a 1-byte mask per adapter input feature
    lora = train_plan(s, replace(base, method="lora", lora_dropout=0.05), 80)
    inputs = 3 * 4096 + 4096 + 2 * 4096 + 14336  # q, k, v, o, gate, up, down
    assert lora.gb("activations") - plain.gb("activations") == pytest.approx(2 * 4096 * 32 * 3 * inputs / GB)


def test_dpo_counts_both_sequences_of_a_pair_and_a_full_fine_tunes_reference_copy():
    s = shape(LLAMA3_8B)
    sft = TrainSetup(gpus=8, zero_stage=2, micro_batch_size=1, seq_len=2048)
    dpo = train_plan(s, replace(sft, preference=True), 80)
    plain = train_plan(s, sft, 80)
    # a row is a pair: twice the tokens through the layers and the LM head
    assert dpo.gb("activations", "logits") == pytest.approx(2 * plain.gb("activations", "logits"))
    # full fine-tuning keeps a frozen bf16 reference: whole under ZeRO-2, sharded under ZeRO-3 and FSDP2
    assert dpo.gb("reference model") == pytest.approx(2 * s.params / GB)
    zero3 = train_plan(s, replace(sft, preference=True, zero_stage=3), 80)
    assert zero3.gb("reference model") == pytest.approx(2 * s.params / 8 / GB)
    fsdp2 = train_plan(s, replace(sft, preference=True, fsdp2=True), 80)
    assert fsdp2.gb("reference model") == pytest.approx(4 * s.params / 8 / GB)
    # LoRA's reference is the base with its adapters off: no copy
    lora = train_plan(s, replace(sft, preference=True, method="lora"), 80)
    assert "reference model" not in [row.part for row in lora.rows]


def test_serving_70b_over_8_gpus_fits_and_on_one_does_not():
    s = shape(LLAMA3_70B)
    assert s.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2  # 320 KiB per token
    over_8 = serve_plan(s, ServeSetup(tensor_parallel=8, sequences=16), 80)
    assert over_8.fits and over_8.gb("weights") == pytest.approx(s.params * 2 / 8 / GB)
    assert over_8.gb("KV cache") == pytest.approx(16 * 8192 * 40 * 1024 / GB)
    assert not serve_plan(s, ServeSetup(sequences=16), 80).fits


def test_config_json_is_found_locally_in_the_cache_or_shipped(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(SHIPPED_CONFIGS / LLAMA3_8B / "config.json", folder)
    assert find_config(str(folder)) == folder
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert find_config("meta-llama/Meta-Llama-3-8B") == SHIPPED_CONFIGS / LLAMA3_8B
    assert find_config("meta-llama/Meta-Llama-3-8B", revision="abc123") is None  # another revision: not shipped
    assert find_config("someone/unknown-model") is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "mamba", "hidden_size": 768}')
    assert shape_from_source(str(tmp_path / "other")) is None  # not a shape it can count: no plan, no crash


def ragft_train(*overrides: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragft", "train", *overrides, f"out_dir={tmp_path / 'run'}",
                           f"registry.path={tmp_path / 'registry.jsonl'}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


LLAMA3_8B_FULL_ON_8 = ["method=full", "cluster=slurm", "cluster.nodes=1", "cluster.dry_run=true",
                       "data.max_seq_len=4096", "train.micro_batch_size=1"]


def test_8b_full_fine_tuning_under_ddp_is_refused_naming_the_memory(tmp_path):
    folder = tmp_path / "llama3-8b"  # a config.json and nothing else: no weights, no tokenizer
    folder.mkdir()
    shutil.copy(SHIPPED_CONFIGS / LLAMA3_8B / "config.json", folder)
    done = ragft_train("model=local", f"model.source={folder}", "strategy=ddp", *LLAMA3_8B_FULL_ON_8,
                       tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "weights + gradients + optimizer states alone are 128.5 GB" in done.stderr
    assert "exceeds cluster.gpu_memory_gb=80" in done.stderr
    assert "it would fit with strategy=zero3" in done.stderr and "method=lora" in done.stderr


def test_8b_full_fine_tuning_under_zero3_validates_and_renders(compose_train):
    from ragft.train.slurm import render

    overrides = ["model=llama3_8b", "strategy=zero3", *LLAMA3_8B_FULL_ON_8]
    script = render(validate_train(compose_train(*overrides)), overrides)
    assert script.startswith("#!/bin/bash") and "#SBATCH --gpus-per-node=8" in script.splitlines()


def test_plan_flag_prints_the_table_and_starts_nothing(tmp_path):
    done = ragft_train("model=llama3_8b", "strategy=zero3", *LLAMA3_8B_FULL_ON_8, "--plan", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "meta-llama/Meta-Llama-3-8B (8.03B parameters), method=full, strategy=zero3, bf16, 8 GPUs" in done.stdout
    assert re.search(r"total +33\.\d +of 80\.0 GB \(cluster\.gpu_memory_gb\): fits", done.stdout)
    assert not (tmp_path / "run").exists() and not done.stdout.startswith("#!/bin/bash")


@pytest.mark.parametrize("model", ["llama3_70b", "qwen2_5_72b"])
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_70b_recipes_fit_4_nodes_of_8_h100_with_lora(compose_train, model, strategy):
    from ragft.train.spec import Hardware, memory_plan

    cfg = compose_train(f"model={model}", f"strategy={strategy}", "cluster=slurm", "cluster.nodes=4",
                        "cluster.dry_run=true", "data.max_seq_len=4096", "train.micro_batch_size=1")
    spec = validate_train(cfg)
    _, setup, plan = memory_plan(spec, spec.model, Hardware(cuda=False, remote_gpus=True))
    assert setup.method == "lora" and setup.gpus == 32 and plan.fits and plan.total < 40 * GB
    with pytest.raises(ConfigError, match=r"it would fit with strategy=zero3"):
        validate_train(compose_train(f"model={model}", "strategy=zero2", "cluster=slurm", "cluster.nodes=4",
                                     "cluster.dry_run=true", "data.max_seq_len=4096", "train.micro_batch_size=1"))
