"""ragft eval: base vs fine-tuned, each with and without retrieval, on the team's questions."""
