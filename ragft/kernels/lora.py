"""LoRA's update with dropout, keeping the layer's input instead of a dropped-out copy of it.

PEFT computes `scaling * B(A(dropout(x)))`, and autograd keeps `dropout(x)` (and its mask) for A's
gradient: one copy of the input per adapted projection, so q, k and v each keep their own copy of the
same normed hidden state, gate and up another two. With `model.kernels=ragft` and LoRA dropout above 0,
`LoraDropoutUpdate` keeps `x` itself (shared by every projection that reads it) and the random-number
generator's state from just before the dropout. The backward replays the dropout from that state, as
activation checkpointing does, so the mask is the one the forward drew, bit for bit, and the generator
advances exactly as under PEFT: losses and gradients equal PEFT's.

Math, for x (..., in), A (r, in), B (out, r), noise = mask / (1 - p) with mask ~ Bernoulli(1 - p):

    forward   h = (x * noise) A^T              y = scaling * h B^T
    backward  g = scaling * dy   dB = g^T h   dh = g B   dA = dh^T (x * noise)   dx = (dh A) * noise

Only the plain training case takes this path (one active adapter, no DoRA or other variant, no LoRA bias,
not merged, no mixed-adapter batch); anything else runs PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def replay_noise(shape: torch.Size, dtype: torch.dtype, device: torch.device, p: float,
                 state: torch.Tensor) -> torch.Tensor:
    """Dropout's `mask / (1 - p)` for a tensor of this shape and dtype, drawn from `state` (the generator is left as
    is). Dropout of ones is its noise, and draws exactly what dropout of any such tensor drew."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return F.dropout(torch.ones(shape, dtype=dtype, device=device), p, True)


class LoraDropoutUpdate(torch.autograd.Function):
    """`scaling * B(A(dropout(x)))`, saving x, A, B, h and the generator's state (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, scaling: float) -> torch.Tensor:
        # PEFT casts the input to the adapter's dtype before the dropout; x is kept as it came (under autocast a
        # projection's input is often in the lower dtype) and cast again in the backward.
        state = rng_state(x.device)
        h = F.linear(F.dropout(x.to(a.dtype), p, True), a)
        ctx.save_for_backward(x, a, b, h)
        ctx.state, ctx.p, ctx.scaling = state, p, scaling
        return F.linear(h, b) * scaling

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, a, b, h = ctx.saved_tensors
        dtype = h.dtype  # the forward's compute dtype (lower under autocast than the weights')
        g = (dy.to(dtype) * ctx.scaling).flatten(0, -2)
        db = (g.t() @ h.flatten(0, -2)).to(b.dtype) if ctx.needs_input_grad[2] else None
        dh = g @ b.to(dtype)
        noise = replay_noise(x.shape, a.dtype, x.device, ctx.p, ctx.state)
        da = None
        if ctx.needs_input_grad[1]:
            da = (dh.t() @ (x.to(a.dtype) * noise).flatten(0, -2).to(dtype)).to(a.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = ((dh @ a.to(dtype)).to(a.dtype).view_as(noise) * noise).to(x.dtype)
        return dx, da, db, None, None


def replayable_adapter(layer, kwargs: dict) -> str | None:
    """The adapter whose update `LoraDropoutUpdate` computes for this call of `layer`, or None: PEFT's path."""
    if not layer.training or layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    if name in layer.lora_variant or not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0:
        return None
    return name if layer.lora_B[name].bias is None else None


def lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT `lora.Linear` forward that takes `LoraDropoutUpdate` where it applies."""
    name = replayable_adapter(self, kwargs)
    if name is None:
        return self.ragft_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    update = LoraDropoutUpdate.apply(x, a, b, self.lora_dropout[name].p, self.scaling[name])
    return (result + update).to(result.dtype)


def replay_lora_dropout(model) -> int:
    """Patch every PEFT LoRA Linear inside `model` (instances, not the class); returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, "ragft_peft_forward"):
            module.ragft_peft_forward = module.forward
            module.forward = types.MethodType(lora_forward, module)
            count += 1
    return count
