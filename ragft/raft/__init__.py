"""RAFT: retrieval-aware fine-tuning rows built from training questions and an index (build), and `ragft data raft` (job)."""
