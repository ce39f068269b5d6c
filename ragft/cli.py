"""`ragft <command> [hydra overrides]`: one Hydra app per command, each a few lines into the package.

  ragft train  → ragft.config.spec.validate_train → ragft.train.run.run
  ragft index  → ragft.index.build.validate_index → ragft.index.build.run_index
  ragft search → ragft.index.build.validate_index(command="search") → run_search → JSON lines on stdout
Exit codes: 0 done; 2 bad config or bad input (nothing started); 1 the job failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ragft.config.schema import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
COMMANDS = ("train", "index", "search")

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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="index")
def index(cfg: DictConfig) -> None:
    from ragft.config.spec import ConfigError
    from ragft.data.rows import BadRowError
    from ragft.index.build import run_index, validate_index

    try:
        run_index(validate_index(cfg))
    except ConfigError as err:
        print(f"ragft index: the config has {len(err.problems)} problem(s); nothing was started:\n{err}",
              file=sys.stderr)
        return _finish(2)
    except BadRowError as err:
        print(f"ragft index: bad document, nothing was written:\n  {err}\n"
              f"  (corpus.on_bad_row=skip skips bad rows and counts them)", file=sys.stderr)
        return _finish(2)
    except Exception as err:
        print(f"ragft index: the job failed: {err}\n  logs: {cfg.out_dir}", file=sys.stderr)
        return _finish(1)
    _finish(0)


# search only reads: no run folder, no log file, and nothing but hits on stdout (JSON lines).
SEARCH_QUIET = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="index")
def search(cfg: DictConfig) -> None:
    import contextlib
    import json

    from ragft.config.spec import ConfigError
    from ragft.index.build import run_search, validate_index

    try:
        # Libraries print on import (transformers announces WANDB_MODE=offline): stdout is for hits only.
        with contextlib.redirect_stdout(sys.stderr):
            hits = run_search(validate_index(cfg, command="search"))
    except ConfigError as err:
        print(f"ragft search: the config has {len(err.problems)} problem(s):\n{err}", file=sys.stderr)
        return _finish(2)
    except Exception as err:
        print(f"ragft search: the search failed: {err}", file=sys.stderr)
        return _finish(1)
    for hit in hits:
        print(json.dumps(hit.to_json(), ensure_ascii=False), flush=True)
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
    if command == "search":
        sys.argv[1:] = SEARCH_QUIET + sys.argv[1:]
    register_configs()
    register_resolvers()
    app = {"train": train, "index": index, "search": search}[command]
    try:
        app()
    except SystemExit as exit_:
        # Hydra exits 1 on a config it cannot compose (unknown key, bad type): that is a bad config.
        if _exit_code is None and exit_.code not in (0, None):
            sys.exit(2)
        raise
    sys.exit(_exit_code or 0)
