"""`ragft <command> [hydra overrides]`: one Hydra app per command, each a few lines into the package.

  ragft train  → ragft.config.spec.validate_train → ragft.train.run.run
Exit codes: 0 done; 2 bad config or bad input (nothing started); 1 the job failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ragft.config.schema import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
COMMANDS = ("train",)

_exit_code = None  # set by the command body; None means Hydra failed before the body ran


def _finish(code: int) -> None:
    global _exit_code
    _exit_code = code


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train(cfg: DictConfig) -> None:
    from ragft.config.spec import ConfigError, validate_train
    from ragft.data.rows import BadRowError
    from ragft.data.tokenize import ChatTemplateError
    from ragft.train.run import Interrupted, run

    try:
        spec = validate_train(cfg)
        run(spec)
    except ConfigError as err:
        print(f"ragft train: the config has {len(err.problems)} problem(s); nothing was started:\n{err}",
              file=sys.stderr)
        return _finish(2)
    except (BadRowError, ChatTemplateError) as err:
        print(f"ragft train: bad training data, nothing was started:\n  {err}\n"
              f"  (data.on_bad_row=skip skips bad rows and counts them)", file=sys.stderr)
        return _finish(2)
    except Interrupted as err:
        print(f"ragft train: {err}", file=sys.stderr)
        return _finish(130)
    except Exception as err:
        print(f"ragft train: the job failed: {err}\n  logs: {cfg.out_dir}", file=sys.stderr)
        return _finish(1)
    _finish(0)


def register_resolvers() -> None:
    from ragft.sample import sample_path

    if not OmegaConf.has_resolver("sample"):
        OmegaConf.register_new_resolver("sample", sample_path)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: ragft {{{','.join(COMMANDS)}}} [key=value ...] [--cfg job] [--help]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"ragft {command}"
    if command == "train":
        from ragft.train.resume import expand_resume

        sys.argv[1:] = expand_resume(sys.argv[1:])
    register_configs()
    register_resolvers()
    app = {"train": train}[command]
    try:
        app()
    except SystemExit as exit_:
        # Hydra exits 1 on a config it cannot compose (unknown key, bad type): that is a bad config.
        if _exit_code is None and exit_.code not in (0, None):
            sys.exit(2)
        raise
    sys.exit(_exit_code or 0)
