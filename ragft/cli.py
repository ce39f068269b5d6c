"""`ragft <command> [hydra overrides]`: one Hydra app per command, each a few lines into the package.

  ragft train  → ragft.train.spec.validate_train → ragft.train.run.run (--plan: the memory plan per GPU, then exit)
  ragft index  → ragft.index.build.validate_index → ragft.index.build.run_index
  ragft search → ragft.index.build.validate_index(command="search") → run_search → JSON lines on stdout
  ragft serve  → ragft.serve.spec.validate_serve → ragft.serve.run.run_serve (foreground until Ctrl-C)
  ragft serve promote checkpoint=<ref> serve.url=<url> as=<name> [--force] → ragft.serve.promote.run_promote
  ragft eval   → ragft.eval.spec.validate_eval → ragft.eval.run.run_eval → report.{json,md,png} + registry
  ragft data raft → ragft.raft.job.validate_raft → run_raft → RAFT chat rows (JSONL)
  ragft export → ragft.export.spec.validate_export → ragft.export.write.run_export → one merged model folder
  ragft demo   → ragft.demo.run_demo: train → index → RAFT → eval on the original and the updated corpus
  ragft registry list [registry.path=...] → ragft.registry.table
Exit codes (ragft/exit_codes.py): 0 done; 2 bad config or bad input (nothing started); 1 the job failed;
130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

from ragft.config.compose import CONF_PATH, register_resolvers
from ragft.config.schema import register_configs
from ragft.exit_codes import run_command

COMMANDS = ("train", "index", "search", "serve", "eval", "data", "demo", "export", "registry")

_exit_code = None  # set by the command body; None means Hydra failed before the body ran
_plan_only = False  # `ragft train --plan`: print the memory plan of the validated job, start nothing


def _run(command: str, body: Callable[[], None], logs: str, bad_input_hint: str = "") -> None:
    global _exit_code
    _exit_code = run_command(command, body, logs, bad_input_hint)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
def train(cfg: DictConfig) -> None:
    def body() -> None:
        from hydra.core.hydra_config import HydraConfig

        from ragft.sweep.trial import trial_of_hydra_job
        from ragft.train import slurm
        from ragft.train.run import run
        from ragft.train.spec import validate_train

        spec = validate_train(trial_of_hydra_job(cfg))  # in a sweep: the trial's own folder and W&B group
        if _plan_only:
            from ragft.train.spec import plan_table

            print(plan_table(spec), flush=True)
            return
        if spec.cluster.name == "slurm" and not slurm.in_allocation():
            slurm.submit(spec, list(HydraConfig.get().overrides.task))  # the allocation runs this job again
        else:
            run(spec)

    _run("train", body, cfg.out_dir, "\n  (data.on_bad_row=skip skips bad rows and counts them)")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="index")
def index(cfg: DictConfig) -> None:
    def body() -> None:
        from ragft.index.build import run_index, validate_index

        run_index(validate_index(cfg))

    _run("index", body, cfg.out_dir, "\n  (corpus.on_bad_row=skip skips bad rows and counts them)")


# search only reads: no run folder, no log file, and nothing but hits on stdout (JSON lines).
PLAN_QUIET = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
SEARCH_QUIET = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="index")
def search(cfg: DictConfig) -> None:
    import contextlib
    import json

    hits = []

    def body() -> None:
        from ragft.index.build import run_search, validate_index

        # Libraries print on import (transformers announces WANDB_MODE=offline): stdout is for hits only.
        with contextlib.redirect_stdout(sys.stderr):
            hits.extend(run_search(validate_index(cfg, command="search")))

    _run("search", body, "stderr")
    for hit in hits:
        print(json.dumps(hit.to_json(), ensure_ascii=False), flush=True)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="serve")
def serve(cfg: DictConfig) -> None:
    def body() -> None:
        from ragft.serve.run import run_serve
        from ragft.serve.spec import validate_serve

        run_serve(validate_serve(cfg))

    _run("serve", body, cfg.out_dir)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="eval")
def eval_(cfg: DictConfig) -> None:
    def body() -> None:
        from ragft.eval.run import run_eval
        from ragft.eval.spec import validate_eval

        run_eval(validate_eval(cfg))

    _run("eval", body, cfg.out_dir, "\n  (qa.on_bad_row=skip skips bad rows and counts them)")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="raft")
def data_raft(cfg: DictConfig) -> None:
    def body() -> None:
        from ragft.raft.job import run_raft, validate_raft

        run_raft(validate_raft(cfg))

    _run("data raft", body, cfg.out_dir, "\n  (qa.on_bad_row=skip skips bad rows and counts them)")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
def export(cfg: DictConfig) -> None:
    def body() -> None:
        from ragft.export.spec import validate_export
        from ragft.export.write import run_export

        exported = run_export(validate_export(cfg))
        print(f"ragft export: wrote {exported.path}", flush=True)

    _run("export", body, "stdout")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="demo")
def demo(cfg: DictConfig) -> None:
    def body() -> None:
        from ragft.demo import run_demo

        run_demo(cfg)

    _run("demo", body, cfg.out_dir)


def registry_command(args: list[str]) -> int:
    """`ragft registry list [registry.path=<file>]`: the registered checkpoints and their eval metrics."""
    from ragft import registry
    from ragft.config.schema import RegistryConfig

    path = RegistryConfig.path
    for arg in args[1:]:
        key, _, value = arg.partition("=")
        if key != "registry.path" or not value:
            print(f"ragft registry: unknown argument {arg!r} (expected registry.path=<file>)", file=sys.stderr)
            return 2
        path = value
    if args[:1] != ["list"]:
        print("usage: ragft registry list [registry.path=<file>]", file=sys.stderr)
        return 2
    print(registry.table(path))
    return 0


def promote_command(args: list[str]) -> int:
    """`ragft serve promote checkpoint=<ref> serve.url=<url> as=<name> [--force] [promote.<key>=...]`: serve.yaml's
    keys, `as=` for promote.name and `--force` for promote.force=true."""
    def body() -> None:
        from ragft.config.compose import compose_config
        from ragft.config.validation import typed_job_config
        from ragft.errors import ConfigError
        from ragft.serve.promote import run_promote

        overrides = ["promote.force=true" if a == "--force" else "promote.name=" + a[3:] if a.startswith("as=")
                     else a for a in args]
        try:
            cfg = compose_config("serve", overrides)
        except Exception as err:  # an unknown key or a bad value: Hydra says which
            raise ConfigError([str(err).splitlines()[0]]) from None
        run_promote(typed_job_config(cfg))

    return run_command("serve promote", body, "stderr")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: ragft {{{','.join(COMMANDS)}}} [key=value ...] [--cfg job] [--help]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    if command == "registry":  # reads one file: no Hydra app, no run folder
        sys.exit(registry_command(sys.argv[1:]))
    if command == "serve" and sys.argv[1:2] == ["promote"]:  # talks to a running server: no run folder either
        sys.exit(promote_command(sys.argv[2:]))
    if command == "data":  # `ragft data <builder>`: RAFT is the one builder so far
        if sys.argv[1:2] != ["raft"]:
            print("usage: ragft data raft qa.path=<questions> index.path=<index> [key=value ...]", file=sys.stderr)
            sys.exit(2)
        command = "data raft"
        sys.argv.pop(1)
    sys.argv[0] = f"ragft {command}"
    if command == "train":
        from ragft.train.resume import expand_resume

        sys.argv[1:] = expand_resume(sys.argv[1:])
    if command == "train" and "--plan" in sys.argv[1:]:  # no run folder, no log file: the table on stdout only
        global _plan_only
        _plan_only = True
        sys.argv[1:] = PLAN_QUIET + [a for a in sys.argv[1:] if a != "--plan"]
    if command == "search":
        sys.argv[1:] = SEARCH_QUIET + sys.argv[1:]
    if command == "train" and "hydra/launcher=submitit_slurm" in sys.argv[1:]:
        from ragft.train.slurm import submitit_overrides

        sys.argv[1:] += submitit_overrides(sys.argv[1:])  # sbatch options from the cluster group
    register_configs()
    register_resolvers()
    app = {"train": train, "index": index, "search": search, "serve": serve, "eval": eval_, "data raft": data_raft,
           "demo": demo, "export": export}[command]
    try:
        app()
    except SystemExit as exit_:
        # Hydra exits 1 on a config it cannot compose (unknown key, bad type): that is a bad config.
        if _exit_code is None and exit_.code not in (0, None):
            sys.exit(2)
        raise
    sys.exit(_exit_code or 0)
