"""The kernels of ragft_kernels (the distribution ragft-kernels, kernels/ in this repository) put into a model:
`llama` patches a loaded Llama-family model with them (`model.kernels=ragft`) or with Liger-Kernel's, and `lora`
replays PEFT's LoRA dropout in the backward instead of keeping its output."""
