"""strategy=fsdp2: PyTorch FSDP2 (`fully_shard`) behind the small engine interface the worker loop uses.

The loop (ragft.train.loop) was written against a DeepSpeed engine: `train()/eval()`, a forward call,
`backward(loss)`, `step()`, `is_gradient_accumulation_boundary()`, `get_lr()`, `get_global_grad_norm()`,
`zero_optimization_stage()` and `.module`. `Fsdp2Engine` offers the same, so `run_worker` stays one path:

- each decoder layer is one FSDP unit (its weights, gradients and AdamW state sharded over the ranks and
  gathered for its forward and backward only), then the root (embeddings, final norm, LM head); under LoRA
  the frozen base is sharded too, and only the adapter matrices train;
- `backward` divides the loss by the accumulation steps, as DeepSpeed does, and skips the gradient
  reduce-scatter on micro-steps that are not an accumulation boundary (`set_requires_gradient_sync`);
- `step` at a boundary clips the global gradient norm (DTensor-aware), steps torch's AdamW and the same
  `warmup_cosine` schedule DeepSpeed steps, and zeroes the gradients.

Precision: on GPUs in bf16 the sharded weights and AdamW state stay fp32 and FSDP gathers bf16 copies for
compute, reducing gradients in fp32 (`MixedPrecisionPolicy`); on CPUs everything is fp32 and the loop's bf16
autocast applies, as under DeepSpeed. `strategy.cpu_offload` keeps the shards, gradients and optimizer step
in host memory (`CPUOffloadPolicy`). `train.compile` compiles each decoder layer before it is sharded.

Checkpoints (`save_state` / `load_state`): model and optimizer shards through torch.distributed.checkpoint
into `<checkpoint>/fsdp/` (`__<rank>_0.distcp` per rank, `.metadata` and `engine_state.json` from rank 0);
under LoRA the frozen base is left out. `full_state_dict` gathers the HF/PEFT weights ragft writes beside them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

ENGINE_STATE = "engine_state.json"  # LR schedule, micro-step count and the loop's trainer state


class Fsdp2Engine(torch.nn.Module):
    """A fully sharded module with its AdamW, schedule and accumulation: what the loop calls an engine."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, grad_accum: int,
                 grad_clip: float):
        super().__init__()
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip if grad_clip > 0 else math.inf  # 0: report the norm, clip nothing
        self.micro_steps = 0
        self.global_grad_norm: float | None = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next `step()` ends an optimizer step (DeepSpeed's meaning: asked before backward)."""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        # gradients of inner micro-steps accumulate unreduced; the boundary's backward reduce-scatters the sum
        self.module.set_requires_gradient_sync(self.is_gradient_accumulation_boundary())
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            trained = [p for p in self.module.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(trained, self.grad_clip)
            self.global_grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.global_grad_norm

    def zero_optimization_stage(self) -> int:
        """3: weights, gradients and optimizer state are all sharded, as under ZeRO-3."""
        return 3


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (inside a PEFT wrapper too): one FSDP unit each."""
    from ragft.kernels.llama import causal_lm_of

    layers = getattr(causal_lm_of(model).base_model, "layers", None)
    if layers is None:
        raise ValueError(f"strategy=fsdp2: no decoder layers found in {type(model).__name__} (expected .model.layers)")
    return list(layers)


def shard(model: torch.nn.Module, spec, device: torch.device) -> torch.nn.Module:
    """Apply `fully_shard` to each decoder layer, then the root (in place); `train.compile` compiles each layer
    first. Returns `model`, now holding DTensor shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    on_gpu = device.type == "cuda"
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute on GPUs, fp32 gradient reduction and fp32 shards for AdamW; CPUs keep fp32 (the loop autocasts)
    bf16 = spec.precision == "bf16" and on_gpu
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    offload = CPUOffloadPolicy(pin_memory=on_gpu) if spec.strategy.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        if spec.train.compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return model


def build_engine(model: torch.nn.Module, spec, device: torch.device, lr_scheduler_factory) -> Fsdp2Engine:
    """Shard `model` and give it torch's AdamW (the update DeepSpeed runs with `torch_adam`) over its trainable
    parameters and the LR schedule `lr_scheduler_factory(optimizer)`."""
    shard(model, spec, device)
    t = spec.train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=1e-8, weight_decay=t.weight_decay)
    return Fsdp2Engine(model, optimizer, lr_scheduler_factory(optimizer), spec.grad_accum, spec.strategy.grad_clip)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_state_dict(model: torch.nn.Module, trainable_only: bool, is_rank0: bool) -> dict | None:
    """Whole tensors of `model` on the CPU of rank 0 (its state_dict names), None elsewhere; collective.
    `trainable_only`: the adapter matrices alone."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True,
                                                         ignore_frozen_params=trainable_only))
    return state if is_rank0 else None


def save_state(engine: Fsdp2Engine, folder: Path, trainer_state: dict, trainable_only: bool, is_rank0: bool) -> None:
    """Write the sharded model and optimizer state of `engine` to `folder` (collective), with its schedule and
    `trainer_state`. `trainable_only`: leave the frozen weights out (an adapter's base is the base model's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(engine.module, engine.optimizer,
                                              options=_options(ignore_frozen_params=trainable_only))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    if is_rank0:
        state = {"lr_scheduler": engine.lr_scheduler.state_dict(), "micro_steps": engine.micro_steps,
                 "trainer_state": trainer_state}
        (folder / ENGINE_STATE).write_text(json.dumps(state, indent=2))


def load_state(engine: Fsdp2Engine, folder: Path, trainable_only: bool) -> dict:
    """Load what `save_state` wrote into `engine` (collective); returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _options(ignore_frozen_params=trainable_only, strict=not trainable_only)
    model_state, optim_state = get_state_dict(engine.module, engine.optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(engine.module, engine.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=options)
    saved = json.loads((folder / ENGINE_STATE).read_text())
    engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    engine.micro_steps = saved["micro_steps"]
    return saved["trainer_state"]
