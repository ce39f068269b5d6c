"""`hydra/launcher=ray_tune`: ragft's Hydra launcher that runs the trials of `ragft train -m` as Ray Tune
trials (ray_tune_launcher.py). Hydra finds it in the `hydra_plugins` namespace package: there is no
hydra_plugins/__init__.py on purpose."""
