"""ragft's Hydra configs: one YAML file per command, one folder per config group. A package so that Hydra
finds them as `pkg://ragft.conf` wherever ragft is installed (a checkout, a wheel, a zip)."""
