"""Sweeps: `ragft train -m ...` (Hydra multirun) on any launcher, ranked in sweep.json and sweep.md."""
