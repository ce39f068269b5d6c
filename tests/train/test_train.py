"""End-to-end training on the shared local Ray: real Ray Train workers, real DeepSpeed, the tiny model.

Each run is compared against what plain transformers / peft load from its checkpoint,
and, for ZeRO-3, against DeepSpeed's own reconstruction of the sharded weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ragft.checkpoints import complete_checkpoints, verify
from ragft.jsonl import read_rows
from ragft.train.run import run
from ragft.train.spec import validate_train

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

FAST = [
    "cluster.num_workers=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=16",
    "train.log_every=2",
    "train.eval_every=4",
    "train.save_every=4",
    "train.eval_max_batches=4",
]


def train(compose_train, *overrides: str) -> dict:
    return run(validate_train(compose_train(*FAST, *overrides)))


def history(result: dict) -> list[dict]:
    return read_rows(Path(result["out_dir"]) / "metrics.jsonl")


def generate(model, folder) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "Where is it?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 6 or out[0, -1] == tok.eos_token_id
    return out


# Each method and each sharding path once through Ray Train (LoRA under ZeRO-3:
# test_zero3_lora_adapter_equals_gathered_weights and tests/train/test_cli.py; stage 0 (ddp) and full under
# ZeRO-2: the one-process loop in tests/train/test_local.py): the full 2×3 grid here cost minutes of CI.
@pytest.mark.parametrize("method, strategy", [("lora", "zero2"), ("full", "zero3")])
def test_train_lowers_loss_and_saves_loadable_checkpoints(ray_cluster, compose_train, method, strategy):
    lr = "3e-3" if method == "full" else "1e-2"
    pinned = (method, strategy) == ("lora", "zero2")
    precision = ["strategy.precision=fp32"] if pinned else []  # the pinned losses are fp32's, whatever the CPU
    result = train(compose_train, f"method={method}", f"strategy={strategy}", "train.max_steps=8", f"train.lr={lr}",
                   *precision)
    steps = history(result)
    assert [m["step"] for m in steps] == [2, 4, 6, 8]
    if pinned:
        # Seed 0, 2 workers: a silent change to the init, data order, masking, packing or loop moves these.
        first = [m["loss"] for m in steps[:2]]
        assert first == pytest.approx(PINNED_LORA_ZERO2, abs=1e-4), first
        assert result["data"]["packing_efficiency"] >= 0.95
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3, steps
    assert steps[-1]["eval_loss"] < steps[1]["eval_loss"], steps  # eval runs at step 4 and 8

    ckpts = complete_checkpoints(Path(result["out_dir"]) / "checkpoints")
    assert [p.name for p in ckpts] == ["4", "8"]  # keep_last=2
    final = ckpts[-1]
    assert result["final_checkpoint"] == str(final)
    assert verify(final) == []
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["step"] == 8 and manifest["method"] == method and manifest["strategy"] == strategy
    assert (final / "deepspeed" / "state").is_dir()
    assert not list(final.parent.glob(".tmp-*"))

    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(final)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(Path(result["out_dir"]) / "base_model")
        model = PeftModel.from_pretrained(base, final)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
    generate(model.eval(), final)


def test_zero3_lora_adapter_equals_gathered_weights(ray_cluster, compose_train):
    """With persistence thresholds at 0 every LoRA matrix is really partitioned across the 2 ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    result = train(compose_train, "method=lora", "strategy=zero3", "strategy.param_persistence_threshold=0",
                   "strategy.model_persistence_threshold=0", "train.max_steps=4", "train.lr=1e-2")
    final = Path(result["final_checkpoint"])
    saved = load_file(final / "adapter_model.safetensors")
    ds_dir = final / "deepspeed"
    assert len(list((ds_dir / "state").glob("*optim_states.pt"))) == 2  # one optimizer shard per rank
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")
    reference = {k.replace(".default", ""): v for k, v in reference.items() if "lora_" in k}
    assert set(saved) == set(reference) and len(saved) == 2 * 7 * 2  # layers × modules × (A, B)
    for name, tensor in saved.items():
        assert tensor.shape == reference[name].shape and tensor.numel() > 0, name
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    assert all(saved[n].abs().sum() > 0 for n in saved if "lora_B" in n)



PINNED_LORA_ZERO2 = [7.426256, 7.396519]  # mean loss of steps 1-2 and 3-4; identical across runs (moved by c27a04d's chat template)
