"""The training objective: the SFT loss, or direct preference optimisation (DPO / IPO) on pairs.

`objective_loss` is what the worker loop calls for every micro-batch and eval batch. With `objective=sft` it is
`ragft.train.loss.causal_lm_loss`. With `objective=dpo` a batch row is one pair (ragft.data.pairs): the chosen
sequence, then the rejected one, each a segment whose positions restart at 0, labels on the reply only. Then

    log π(y|x) = Σ over reply tokens of log p(token | everything before it in its own segment)

for the policy and for the reference, and with d = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)]

    sigmoid (DPO, conservative with ε = label_smoothing):  −(1 − ε)·log σ(β d) − ε·log σ(−β d)
    ipo:  (d̄ − 1/(2β))²  where d̄ uses each reply's log-ratio divided by its reply token count (as TRL does)

averaged over pairs. The rewards are β·(log π − log π_ref) of each reply; reward accuracy is the share of pairs whose
chosen reward is higher. tests/train/test_dpo.py checks loss and gradients against TRL's DPOTrainer.

Both sequences of a pair go through the memory-saving path of `ragft.train.loss`: only labelled positions reach the
vocabulary projection (`labelled_positions` + `logits_to_keep`), and their log-softmax is taken in fp32.

The reference model:
- LoRA / QLoRA: the policy itself with its adapters disabled (peft's `disable_adapter()`), under no_grad. No second
  copy of anything; the frozen base is exactly the reference.
- full fine-tuning: a frozen copy of the base model, loaded once per worker in the training dtype, without
  gradients or optimizer state, and sharded like the policy under ZeRO-3 (a DeepSpeed engine with no optimizer)
  and under FSDP2 (`fully_shard` per decoder layer, as the policy).
  Why a copy rather than reference log-probs precomputed in a first pass: the copy costs 2 bytes per parameter in
  bf16 (under ZeRO-3, 2/N per rank), against the policy's ~16 (bf16 weights, fp32 master, gradients, two Adam
  moments), so it is at most an eighth more memory when both are sharded alike; precomputing would cost no memory
  but an extra pass over the data before step 0, a table keyed by row that must follow Ray Data's sharding, and a
  file saved with every checkpoint for an exact resume. The copy is rebuilt from the base weights on resume, so a
  resumed run is exact with nothing saved. With ZeRO-0/1/2 the copy is whole on every rank: for a large model use
  zero3 or fsdp2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ragft.data.tokenize import IGNORE_INDEX
from ragft.train.loss import causal_lm_loss, labelled_positions

PAIR_SUMS = ("pairs", "loss", "reward_correct", "reward_margin", "logps_chosen", "logps_rejected",
             "rewards_chosen", "rewards_rejected")


def objective_loss(model, batch: dict[str, torch.Tensor], objective, reference=None) -> tuple[torch.Tensor, dict]:
    """(the loss to minimise, the pair sums of `PAIR_SUMS` for metrics; empty for sft).

    `objective` is an ObjectiveConfig; `reference` the frozen full-fine-tuning copy (None: LoRA, adapters off)."""
    if objective.name != "dpo":
        return causal_lm_loss(model, batch), {}
    dpo = objective.dpo
    with torch.no_grad():
        ref_logps, _ = reference_logps(model, batch, reference)
    logps, counts = sequence_logps(model, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, ref_logps, counts, dpo.beta, dpo.label_smoothing,
                                                        dpo.loss_type)
    return losses.mean(), pair_sums(losses.detach(), logps.detach(), chosen_rewards, rejected_rewards)


def reference_logps(model, batch: dict[str, torch.Tensor], reference=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of the reference: `reference` when given, else `model` with its LoRA adapters disabled."""
    if reference is not None:
        return sequence_logps(reference, batch)
    peft_model = getattr(model, "module", model)  # inside a DeepSpeed engine
    with peft_model.disable_adapter():
        return sequence_logps(model, batch)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, label counts), each (batch, 2): the sum over each pair's chosen (column 0) and rejected
    (column 1) reply tokens of log p(token), and how many tokens that is."""
    labels = batch["labels"]
    keep, targets = labelled_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    token_logps = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none")
    target_segment = torch.zeros_like(labels)
    target_segment[:, :-1] = pair_segments(batch["position_ids"])[:, 1:]  # position t predicts token t + 1
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    if keep.dtype == torch.bool:  # a row mask: the kept positions in row-major order
        rows, segment = rows[keep], target_segment[keep]
    else:  # the batch's labelled columns: (batch, columns), IGNORE_INDEX targets where a row has none
        rows, segment = rows[:, keep].reshape(-1), target_segment[:, keep].reshape(-1)
    counted = targets.reshape(-1) != IGNORE_INDEX
    if bool((segment[counted] > 1).any()):
        raise ValueError("a labelled token lies outside a pair's two segments: these rows are not preference pairs")
    slot = rows * 2 + segment.clamp(max=1)
    logps = torch.zeros(labels.shape[0] * 2, dtype=torch.float32, device=labels.device)
    logps = logps.index_add(0, slot, token_logps)
    counts = torch.zeros_like(logps).index_add(0, slot, counted.float())
    return logps.view(-1, 2), counts.view(-1, 2)


def pair_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """The segment of every position (batch, sequence): 0 the chosen sequence, 1 the rejected one, 2 and above
    the padding (collate restarts positions at each)."""
    return (position_ids == 0).long().cumsum(1) - 1


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, counts: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (batch,), from (batch, 2) sequence log-probs of
    policy and reference and the reply token counts (IPO's length normalisation)."""
    ratios = logps - ref_logps  # (batch, 2): chosen, rejected log-ratios
    if loss_type == "sigmoid":
        d = ratios[:, 0] - ratios[:, 1]
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        mean_ratios = ratios / counts.clamp(min=1)
        losses = (mean_ratios[:, 0] - mean_ratios[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid or ipo")
    rewards = beta * ratios.detach()
    return losses, rewards[:, 0], rewards[:, 1]


def pair_sums(losses: torch.Tensor, logps: torch.Tensor, chosen_rewards: torch.Tensor,
              rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Sums over a batch's pairs, to add up across micro-batches and ranks before dividing by `pairs`."""
    margin = chosen_rewards - rejected_rewards
    values = (len(losses), losses.sum(), (margin > 0).sum(), margin.sum(), logps[:, 0].sum(), logps[:, 1].sum(),
              chosen_rewards.sum(), rejected_rewards.sum())
    return {name: float(value) for name, value in zip(PAIR_SUMS, values)}


@dataclass
class PairTotals:
    """`pair_sums` added up: over micro-batches since the last log line, or over an eval pass."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PAIR_SUMS, 0.0))

    def add(self, sums: dict[str, float]) -> None:
        for name, value in sums.items():
            self.sums[name] += value

    def reduced(self, device) -> dict[str, float]:
        """These sums over all ranks (a collective: every rank calls it, DPO or not)."""
        import torch.distributed as dist

        totals = torch.tensor([self.sums[name] for name in PAIR_SUMS], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        return dict(zip(PAIR_SUMS, totals.tolist()))


def pair_metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """reward_accuracy, reward_margin, logps_* and rewards_* (means over pairs) from summed `pair_sums`; nothing
    when there were no pairs (sft)."""
    pairs = sums.get("pairs", 0)
    if not pairs:
        return {}
    means = {"reward_accuracy": sums["reward_correct"] / pairs,
             **{name: sums[name] / pairs for name in PAIR_SUMS[3:]}}
    return {prefix + name: value for name, value in means.items()}


def build_reference(spec, dtype: torch.dtype, device):
    """The frozen reference model of a full fine-tune with objective=dpo, else None (LoRA uses the policy with
    its adapters off; sft needs none)."""
    if spec.objective.name != "dpo" or spec.is_adapter:
        return None
    from dataclasses import replace

    from ragft.model.build import load_model

    model = load_model(spec.base_model_path, spec.model, replace(spec.method, name="full"), dtype,
                       use_cuda=spec.cluster.use_gpu)
    model.requires_grad_(False)
    model.eval()
    if spec.strategy.backend == "fsdp2":
        from ragft.train import fsdp2

        return fsdp2.shard(model, spec, device)  # sharded as the policy, its compute dtype the policy's
    if spec.strategy.zero_stage != 3:
        return model.to(device)
    import deepspeed

    from ragft.train.deepspeed_config import render

    policy_config = render(spec)
    config = {key: policy_config[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                   "bf16", "fp16") if key in policy_config}
    # no optimizer: no optimizer offload either
    config["zero_optimization"] = {k: v for k, v in policy_config["zero_optimization"].items()
                                   if k != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
