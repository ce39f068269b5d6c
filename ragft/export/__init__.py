"""`ragft export`: one merged model from a checkpoint, for servers and tools that know nothing of ragft.

A LoRA checkpoint is folded into its base (peft's `merge_and_unload`), a full fine-tune's gathered weights
are taken as they are; either is written as an HF safetensors folder with its tokenizer and chat template
(`write.py`), or as one GGUF file (`gguf.py`), with a manifest of its own so the export is a checked artifact
like the checkpoint it came from. `spec.py` checks the config before anything loads.
"""
