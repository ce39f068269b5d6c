"""Render the DeepSpeed config from the job spec, and the LR schedule it steps.

The DeepSpeed dict is derived, never hand-kept: batch sizes and accumulation come
from `train`, sharding from `strategy`, precision from the resolved spec.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ragft.train.spec import TrainSpec


def render(spec: TrainSpec) -> dict:
    s, t = spec.strategy, spec.train
    on_gpu = spec.cluster.use_gpu
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage >= 1:
        zero.update(
            overlap_comm=on_gpu,  # overlapping needs CUDA streams; on CPU it only adds copies
            contiguous_gradients=True,
            reduce_bucket_size=s.reduce_bucket_size,
        )
    if s.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=s.param_persistence_threshold,
            model_persistence_threshold=s.model_persistence_threshold,
            stage3_max_live_parameters=s.max_live_parameters,
            # ragft gathers weights itself when it saves (ragft.train.checkpoint), only what it needs.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    optimizer_params = {
        "lr": t.lr,
        "betas": [t.adam_beta1, t.adam_beta2],
        "eps": 1e-8,
        "weight_decay": t.weight_decay,
    }
    if not on_gpu:
        # DeepSpeed's fused and CPU Adam need compiled ops; torch's AdamW is the same update on CPU.
        optimizer_params["torch_adam"] = True
    return {
        "train_batch_size": spec.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": s.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision == "bf16" and on_gpu},  # CPU bf16 is autocast in the loop
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": on_gpu,
        "steps_per_print": 2**31 - 1,  # ragft reports its own metrics
        "wall_clock_breakdown": False,
    }


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup to the peak LR, then cosine decay to `min_lr_ratio` of it.

    Returns a factory DeepSpeed calls with its optimizer. Step 0 already trains
    (factor 1/(warmup+1), not 0), so no step is wasted at lr=0: that is the one difference from transformers'
    `get_cosine_with_min_lr_schedule_with_warmup`, whose warmup starts at 0 (a short run's first step would
    not train), and why this is not that.
    """
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def make(optimizer: Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, factor)

    return make
