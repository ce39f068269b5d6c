"""ragft: fine-tune with Ray Train + DeepSpeed, retrieve with a vector index, evaluate both, serve the winner."""

__version__ = "0.1.0"
