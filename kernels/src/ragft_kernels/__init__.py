"""Training kernels for Llama-family models, each with a torch reference: fused linear + cross-entropy
(linear_ce), RMSNorm (rms_norm), SwiGLU (swiglu) and rotary embedding (rope); where a Triton kernel can run
(runtime). Triton is optional: without it, or on CPU tensors, the torch paths run.

Each module holds one kernel as a slice: the Triton kernel, its launcher, an `autograd.Function`, the
function to call (`linear_cross_entropy`, `rms_norm`, `swiglu`, `rope`) and its `*_reference` in plain torch.
"""
