"""Training kernels for Llama-family models, each with a torch reference: fused linear + cross-entropy
(linear_ce), RMSNorm (rms_norm), SwiGLU (swiglu) and rotary embedding (rope); `llama` puts them into a
model (`model.kernels=ragft`). Triton is optional: without it, or on CPU tensors, the torch paths run."""
