"""objective=dpo against TRL's DPOTrainer: on the same pairs and the same fp32 weights, ragft's DPO / IPO loss and
its gradients equal what `DPOTrainer.compute_loss` gives (TRL 1.16: separate padded sequences, full logits), for a
full model with a frozen reference copy and for LoRA with the adapters disabled as reference; and with the row mask
and with shared columns for `logits_to_keep`. Conservative DPO (label smoothing ε) is checked against TRL as
(1 − ε)·TRL(pairs) + ε·TRL(pairs with chosen and rejected swapped), TRL 1.16's sigmoid loss having no ε.

Tolerance: loss within 1e-5 absolute, gradients within 1e-5 absolute + 1e-4 relative (fp32; the two sides sum the
same log-probs in different orders and shapes).

Then the loop end to end, on the shared Ray cluster: LoRA, 2 workers, ZeRO-2, tiny model, logging the pair
metrics and writing them to metrics.jsonl, the checkpoint manifests and result.json.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers.random_llama import random_llama
from ragft.config.schema import DpoConfig, ObjectiveConfig
from ragft.data.pack import collate
from ragft.data.pairs import EncodedPair, pair_rows
from ragft.data.tokenize import IGNORE_INDEX, Encoded
from ragft.train import loss as loss_module
from ragft.train.dpo import objective_loss

trl = pytest.importorskip("trl", reason="TRL is the reference (pip install 'ragft[test]')")

VOCAB = 97
LOSS_TOL = 1e-5
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


def pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [{"prompt_ids": ids(3, 12), "chosen_ids": ids(1, 6), "rejected_ids": ids(1, 6)} for _ in range(n)]


def ragft_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    def encoded(prompt, reply):
        return Encoded(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply)

    encoded_pairs = [EncodedPair(encoded(r["prompt_ids"], r["chosen_ids"]), encoded(r["prompt_ids"], r["rejected_ids"]))
                     for r in rows]
    batch = collate(pair_rows(encoded_pairs), pad_id=0)
    batch.pop("num_tokens")
    return batch


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def models(lora: bool):
    """(policy, reference or None): a policy that differs from its reference, so the log-ratios are not zero."""
    reference = random_llama(vocab_size=VOCAB, initializer_range=0.1)
    if lora:
        return get_peft_model(reference, LoraConfig(**LORA, init_lora_weights=False)), None
    policy = copy.deepcopy(reference)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, reference.requires_grad_(False)


def trl_trainer(policy, reference, loss_type: str, beta: float, tmp_path):
    """TRL's DPOTrainer on copies of our weights. LoRA: TRL adds a new adapter to a fresh base and gets our adapter's
    weights, so its reference is the base with adapters off, as ours (handed an existing adapter, TRL would take a
    copy of that adapter as the reference instead)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models as tok_models
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(
        {f"t{i}": i for i in range(VOCAB)}, unk_token="t0")), pad_token="t0", eos_token="t1")
    # bf16=False: TRL defaults to bf16, and accelerate wraps the reference forward in autocast
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True,
                     bf16=False, per_device_train_batch_size=8)
    lora = reference is None
    trainer = DPOTrainer(model=random_llama(vocab_size=VOCAB, initializer_range=0.1) if lora else copy.deepcopy(policy),
                         ref_model=None if lora else copy.deepcopy(reference), args=args, processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA) if lora else None,
                         train_dataset=Dataset.from_list([{"prompt": "t5", "chosen": "t6", "rejected": "t7"}]))
    if lora:
        trainer.model.load_state_dict(policy.state_dict(), strict=True)
    return trainer


def trl_loss(trainer, rows) -> torch.Tensor:
    return trainer.compute_loss(trainer.model, trainer.data_collator(rows))


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


def record(name: str, loss_diff: float, grad_diff: float) -> None:
    """The measured distance to TRL (shown with pytest -s)."""
    print(f"{name}: |loss - TRL| = {loss_diff:.2e}, max |grad - TRL| = {grad_diff:.2e}")


@pytest.fixture
def keep_form(request, monkeypatch):
    """True: transformers' per-row logits_to_keep mask; False: the batch's shared columns (older transformers)."""
    if request.param and not loss_module.ROW_MASKS:
        pytest.skip("this transformers takes no per-row logits_to_keep mask")
    monkeypatch.setattr(loss_module, "ROW_MASKS", request.param)
    return request.param


@pytest.mark.parametrize("loss_type, lora, keep_form", [
    ("sigmoid", False, True), ("sigmoid", True, True), ("ipo", False, True), ("ipo", True, True),
    ("sigmoid", False, False),
], ids=["dpo-full", "dpo-lora", "ipo-full", "ipo-lora", "dpo-full-shared-columns"], indirect=["keep_form"])
def test_loss_and_gradients_equal_trl(loss_type, lora, keep_form, tmp_path):
    rows, beta = pairs(6), 0.5
    policy, reference = models(lora)
    trainer = trl_trainer(policy, reference, loss_type, beta, tmp_path)
    objective = ObjectiveConfig(name="dpo", dpo=DpoConfig(beta=beta, loss_type=loss_type))

    ours, sums = objective_loss(policy, ragft_batch(rows), objective, reference)
    ours.backward()
    theirs = trl_loss(trainer, rows)
    theirs.backward()

    assert abs(ours.item() - 0.6931) > 1e-3 or loss_type == "ipo", "log-ratios are zero: a test that proves nothing"
    loss_diff = abs(ours.item() - theirs.item())
    ours_grads, theirs_grads = grads(policy), grads(trainer.model)
    assert ours_grads.keys() == theirs_grads.keys()
    grad_diff = max((ours_grads[n] - theirs_grads[n]).abs().max().item() for n in ours_grads)
    record(f"{loss_type}-{'lora' if lora else 'full'}-{'mask' if keep_form else 'columns'}", loss_diff, grad_diff)
    assert loss_diff < LOSS_TOL, (ours.item(), theirs.item())
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], **GRAD_TOL, msg=name)
    assert sums["pairs"] == len(rows) and 0 <= sums["reward_correct"] <= len(rows)


def test_conservative_dpo_is_the_label_smoothed_mix_of_trl_losses(tmp_path):
    rows, beta, eps = pairs(5, seed=3), 0.3, 0.2
    policy, reference = models(lora=False)
    objective = ObjectiveConfig(name="dpo", dpo=DpoConfig(beta=beta, label_smoothing=eps))
    ours, _ = objective_loss(policy, ragft_batch(rows), objective, reference)
    ours.backward()
    swapped = [{**r, "chosen_ids": r["rejected_ids"], "rejected_ids": r["chosen_ids"]} for r in rows]
    trainer = trl_trainer(policy, reference, "sigmoid", beta, tmp_path)
    theirs = (1 - eps) * trl_loss(trainer, rows) + eps * trl_loss(trainer, swapped)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < LOSS_TOL
    ours_grads, theirs_grads = grads(policy), grads(trainer.model)
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], **GRAD_TOL, msg=name)


def test_rewards_and_accuracy_follow_their_definitions():
    """Reward = β·(log π − log π_ref) per reply, computed here from per-sequence forward passes by hand."""
    rows, beta = pairs(4, seed=5), 0.5
    policy, reference = models(lora=False)
    objective = ObjectiveConfig(name="dpo", dpo=DpoConfig(beta=beta))
    _, sums = objective_loss(policy, ragft_batch(rows), objective, reference)

    def logp(model, prompt, reply):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        return logits.gather(1, torch.tensor(reply)[:, None]).sum().item()

    rewards = [[beta * (logp(policy, r["prompt_ids"], r[k]) - logp(reference, r["prompt_ids"], r[k]))
                for k in ("chosen_ids", "rejected_ids")] for r in rows]
    assert sums["rewards_chosen"] == pytest.approx(sum(c for c, _ in rewards), abs=1e-4)
    assert sums["rewards_rejected"] == pytest.approx(sum(r for _, r in rewards), abs=1e-4)
    assert sums["reward_correct"] == sum(c > r for c, r in rewards)


def test_objective_sft_is_the_causal_lm_loss():
    model = random_llama(vocab_size=VOCAB)
    batch = ragft_batch(pairs(2))
    loss, sums = objective_loss(model, batch, ObjectiveConfig())
    assert sums == {} and loss.item() == pytest.approx(loss_module.causal_lm_loss(model, batch).item())


def preference_rows(path: Path, count: int) -> Path:
    """Pairs from the shipped sample's chat rows: chosen = a question's own answer, rejected = the next row's."""
    from ragft.sample import sample_path

    rows = [json.loads(line) for line in Path(sample_path("train.jsonl")).read_text().splitlines()[:count + 1]]
    pairs_ = [{"messages": row["messages"][:-1], "chosen": row["messages"][-1]["content"],
               "rejected": other["messages"][-1]["content"]} for row, other in zip(rows, rows[1:])]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs_))
    return path


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.parametrize("method, strategy", [("lora", "zero2"), ("full", "zero3")])
def test_ray_train_dpo_logs_pair_metrics_and_learns_the_preference(ray_cluster, compose_train, tmp_path, method,
                                                                    strategy):
    """LoRA (reference: adapters off) under ZeRO-2 and full fine-tuning (reference: a frozen copy, sharded) under
    ZeRO-3, 2 Ray Train workers: the pair metrics reach metrics.jsonl, the manifests, result.json and the registry,
    and the training pairs' reward accuracy and margin rise."""
    from ragft.checkpoints import complete_checkpoints
    from ragft.jsonl import read_rows
    from ragft.train.run import run
    from ragft.train.spec import validate_train

    data = preference_rows(tmp_path / "pairs.jsonl", 36)  # few pairs, seen again each epoch: learnt by heart
    lr = "1e-2" if method == "lora" else "3e-3"
    result = run(validate_train(compose_train(
        "objective=dpo", "data=jsonl", f"data.train_path={data}", "data.max_seq_len=64", "data.eval_fraction=0.1",
        f"method={method}", f"strategy={strategy}", "cluster.num_workers=2", "train.micro_batch_size=4",
        "train.global_batch_size=16", "train.max_steps=8", "train.log_every=2", "train.eval_every=4",
        "train.save_every=4", f"train.lr={lr}", "strategy.precision=fp32", "objective.dpo.beta=0.5")))
    steps = read_rows(Path(result["out_dir"]) / "metrics.jsonl")
    assert [m["step"] for m in steps] == [2, 4, 6, 8]
    for m in steps:
        assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected", "rewards_chosen",
                "rewards_rejected"} <= m.keys()
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"] and steps[-1]["loss"] < steps[0]["loss"], steps
    assert steps[-1]["reward_accuracy"] >= 0.75, steps
    final = result["metrics"]
    assert result["objective"] == "dpo" and 0 <= final["eval_reward_accuracy"] <= 1
    assert final["eval_loss"] == pytest.approx(final["eval_loss"])  # a number, the eval DPO loss
    manifest = json.loads((complete_checkpoints(Path(result["out_dir"]) / "checkpoints")[-1] / "manifest.json")
                          .read_text())
    assert manifest["metrics"]["eval_reward_accuracy"] == final["eval_reward_accuracy"]
    registered = read_rows(tmp_path / "registry.jsonl")
    assert registered[-1]["metrics"]["train.eval_reward_accuracy"] == final["eval_reward_accuracy"]


def test_dpo_settings_and_data_are_checked_before_anything_runs(compose_train, tmp_path):
    """Every objective problem at once (exit 2), then rows of the other objective named by file and line."""
    from ragft.config.compose import compose_config
    from ragft.data.pairs import read_pairs
    from ragft.data.rows import read_examples
    from ragft.errors import ConfigError
    from ragft.jsonl import BadRowError
    from ragft.train.spec import validate_train

    with pytest.raises(ConfigError) as err:
        validate_train(compose_train("objective=dpo", "data.train_on_prompt=true", "objective.dpo.beta=0",
                                     "objective.dpo.label_smoothing=0.6"))
    text = str(err.value)
    assert "data.train_on_prompt=true" in text and "beta=0" in text and "label_smoothing=0.6" in text
    with pytest.raises(ConfigError, match="sigmoid only"):
        validate_train(compose_train("objective=dpo", "objective.dpo.loss_type=ipo", "objective.dpo.label_smoothing=0.1"))
    with pytest.raises(Exception, match="loss_type=hinge"):  # a closed choice (DpoLoss): refused at compose
        compose_config("train", ["objective=dpo", "objective.dpo.loss_type=hinge", f"out_dir={tmp_path}"])

    sft_rows, pair_rows_ = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    sft_rows.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}) + "\n")
    pair_rows_.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(BadRowError, match=r"sft.jsonl:1: .*objective=sft"):
        read_pairs(str(sft_rows))
    with pytest.raises(BadRowError, match=r"pairs.jsonl:1: .*objective=dpo"):
        read_examples(str(pair_rows_))
