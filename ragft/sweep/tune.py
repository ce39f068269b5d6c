"""Ray Tune runs a sweep's trials: each one a whole `ragft train` job with its own Ray Train TorchTrainer
(cluster.num_workers workers, DeepSpeed inside), at most `sweep.max_concurrent` at once, on the Ray
cluster ragft connects to; `sweep.scheduler=asha` stops the trials that fall behind at an evaluation.

The Hydra launcher (hydra_plugins/ragft_ray_tune) composes every trial's config and folder, then:

  validate_trials → one TrainSpec per trial, or one ConfigError listing every trial's problems (nothing ran)
  run_trials      → Tuner over the trial numbers → an Outcome per trial; status.json for stopped/failed ones

Inside a trial `ragft.train.run.run` runs as for `ragft train`, with TuneReportCallback: what the workers
report (every evaluation and checkpoint: spec.report_evals, see ragft.train.loop) reaches Tune, and ASHA compares
trials on `sweep.metric` at sweep.grace_period × train.eval_every steps, then × reduction_factor, ...
A trial ASHA stops ends like a Ctrl-C'd run (checkpoint, W&B run finished, result.json): GracefulASHA.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from ragft.config.schema import SweepConfig
from ragft.errors import ConfigError
from ragft.sweep.report import STATUS_FILE
from ragft.train.loop import STOP_FILE
from ragft.train.spec import TrainSpec, validate_train

STOPPED = "stopped early (asha)"  # the status sweep.md shows for a trial ASHA stopped
# What a trial reserves besides its Train workers (which reserve their own): a sliver for the trial
# function (data preparation, then waiting on the Train controller; Tune refuses zero), and 1 CPU for
# the actors it starts (ragft's progress queue, Train's controller and data actors): Tune captures them
# into the trial's placement group, and Ray needs 1 CPU free there to create an actor (0 once running).
TRIAL_BUNDLES = [{"CPU": 0.1}, {"CPU": 1}]


@dataclass
class Outcome:
    """How one trial ended, as Tune saw it."""

    status: str  # completed | stopped early (asha) | failed
    step: Optional[int] = None  # the last step the workers reported
    value: Optional[float] = None  # sweep.metric at that report, if it carried it
    error: Optional[str] = None


def validate_trials(cfgs: Sequence[DictConfig], labels: Sequence[str], sweep: SweepConfig) -> list[TrainSpec]:
    """Every trial's spec, or one ConfigError with every problem of every trial (each problem once, with
    the trials that have it), so that a bad value in one combination stops the sweep before any trial runs."""
    problems = check_sweep(sweep)
    trials_with = defaultdict(list)  # problem → labels of the trials that have it
    specs = []
    for cfg, label in zip(cfgs, labels):
        try:
            specs.append(validate_train(cfg))
        except ConfigError as err:
            for problem in err.problems:
                trials_with[problem].append(label)
    for problem, which in trials_with.items():
        problems.append(problem if len(which) == len(cfgs) else f"{', '.join(which)}: {problem}")
    if specs:
        problems += check_trials(sweep, specs)
    if problems:
        raise ConfigError(problems)
    return specs


def check_sweep(sweep: SweepConfig) -> list[str]:
    problems = []  # sweep.mode and sweep.scheduler are Enums: compose refused any other value
    if sweep.max_concurrent < 1:
        problems.append(f"sweep.max_concurrent={sweep.max_concurrent} must be at least 1")
    if sweep.scheduler == "asha":
        if sweep.grace_period < 1:
            problems.append(f"sweep.grace_period={sweep.grace_period} must be at least 1 (evaluations)")
        if sweep.reduction_factor < 2:
            problems.append(f"sweep.reduction_factor={sweep.reduction_factor} must be at least 2")
    return problems


def check_trials(sweep: SweepConfig, specs: Sequence[TrainSpec]) -> list[str]:
    """What only the trials' specs tell: where they would run, and whether ASHA could ever stop one."""
    problems = []
    if any(s.cluster.name == "slurm" for s in specs):
        problems.append("cluster=slurm submits a Slurm job per run; hydra/launcher=ray_tune runs the trials on a "
                        "Ray cluster: use cluster=local or cluster=ray (or hydra/launcher=submitit_slurm)")
    if len({s.cluster.address for s in specs}) > 1:
        problems.append("the trials name different cluster.address values; a Tune sweep runs on one Ray cluster")
    fixed = [s.train.max_steps for s in specs if s.train.max_steps > 0]
    if sweep.scheduler == "asha" and len(fixed) == len(specs) and grace_steps(sweep, specs) >= max(fixed):
        problems.append(f"sweep.grace_period × train.eval_every = {grace_steps(sweep, specs)} steps is not below "
                        f"train.max_steps={max(fixed)}: ASHA could never stop a trial; lower them or use "
                        f"sweep.scheduler=fifo")
    return problems


def grace_steps(sweep: SweepConfig, specs: Sequence[TrainSpec]) -> int:
    """ASHA's first rung in steps: `grace_period` evaluations of the trial that evaluates least often."""
    return sweep.grace_period * max(s.train.eval_every for s in specs)


def train_trial(config: dict, specs: Sequence[TrainSpec], cwd: str) -> None:
    """One Tune trial: the `ragft train` run of trial `config["trial"]`, its workers reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ragft.train.run import Interrupted, run

    # Tune starts a trial inside its Tune folder; ragft resolves relative paths (data.train_path, a local
    # model.source) from where `ragft train` was started, as the other launchers do (hydra.job.chdir=false).
    if Path(cwd).is_dir():
        os.chdir(cwd)
    try:
        run(replace(specs[config["trial"]], report_evals=True), callbacks=[TuneReportCallback()])
    except Interrupted:
        pass  # GracefulASHA stopped it: checkpointed, W&B run finished, result.json written; not a failure


def run_trials(specs: Sequence[TrainSpec], labels: Sequence[str], sweep: SweepConfig,
               sweep_dir: str) -> list[Outcome]:
    """Run every trial as a Ray Tune trial; one Outcome per trial, in order."""
    from ray import tune

    from ragft.cluster import init_ray

    # With the embedded Ray, enough logical CPUs for max_concurrent whole jobs: workers, data readers
    # (2, as `ragft train` asks for) and the trial's own bundles.
    per_trial = (max(s.cluster.num_workers * s.cluster.cpus_per_worker for s in specs) + 2
                 + math.ceil(sum(b["CPU"] for b in TRIAL_BUNDLES)))
    init_ray(specs[0].cluster.address if specs[0].cluster.name != "local" else None,
             min(sweep.max_concurrent, len(specs)) * per_trial)
    # Reports without the metric are expected (a checkpoint before the first evaluation): ASHA skips them,
    # where Tune's strict check would fail the trial.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

    out_dirs = [s.out_dir for s in specs]
    scheduler = GracefulASHA(sweep, specs) if sweep.scheduler == "asha" else tune.schedulers.FIFOScheduler()
    lines = TrialLines(labels, out_dirs, sweep.metric, getattr(scheduler, "stopped", {}))
    trainable = tune.with_resources(tune.with_parameters(train_trial, specs=list(specs), cwd=os.getcwd()),
                                    tune.PlacementGroupFactory(TRIAL_BUNDLES))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(specs))))},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=sweep.max_concurrent,
                                    # by job folder: a sweeper that launches in batches reuses indexes
                                    trial_dirname_creator=lambda t: f"trial-{Path(out_dirs[t.config['trial']]).name}"),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(Path(sweep_dir).resolve()),  # the sweep folder: shared storage, as out_dir is
            failure_config=tune.FailureConfig(max_failures=0),  # a trial retries inside Train (cluster.max_failures)
            callbacks=[lines],
            verbose=0,  # TrialLines prints one line per trial event instead of Tune's tables
        ),
    )
    tuner.fit()
    outcomes = [lines.outcomes.get(i) or Outcome("failed", error="did not finish: the sweep ended first")
                for i in range(len(specs))]
    for out_dir, outcome in zip(out_dirs, outcomes):
        if outcome.status != "completed":
            (Path(out_dir) / STATUS_FILE).write_text(json.dumps(
                {"status": outcome.status, "step": outcome.step, "error": outcome.error}, indent=2))
    return outcomes


class GracefulASHA(ASHAScheduler):
    """ASHA over steps whose STOP ends a trial the way Ctrl-C ends `ragft train`: it writes the trial's
    STOP file, and the workers (which poll it every step) save a checkpoint, finish the W&B run and return.
    Tune's own STOP would kill the trial's actors mid-step, losing the buffered W&B records and
    result.json. Which trials it stopped is kept in `stopped` (trial id → step), as Tune lists a stopped
    trial as TERMINATED, like a finished one.

    Rungs are in steps: grace_period × eval_every, then × reduction_factor, ...: each an evaluation step,
    where the workers report eval_loss (ragft.train.loop).
    """

    def __init__(self, sweep: SweepConfig, specs: Sequence[TrainSpec]):
        fixed = [s.train.max_steps for s in specs if s.train.max_steps > 0]
        super().__init__(
            time_attr="step",
            metric=sweep.metric,
            mode=sweep.mode,
            grace_period=grace_steps(sweep, specs),
            reduction_factor=sweep.reduction_factor,
            # max_t only places the rungs (stop_last_trials=False: reaching it stops nothing). Below the
            # last step, so no rung sits on a trial's final report. Unknown before the data is read
            # (train.epochs): no limit.
            max_t=max(fixed) - 1 if len(fixed) == len(specs) else 2**31,
            stop_last_trials=False,
        )
        self.stop_files = [Path(s.out_dir) / STOP_FILE for s in specs]
        self.stopped: dict[str, int] = {}

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != self.STOP:
            return decision
        if trial.trial_id not in self.stopped:
            self.stopped[trial.trial_id] = result.get("step")
            self.stop_files[trial.config["trial"]].touch()
        return self.CONTINUE  # the trial ends itself at its next step


class TrialLines(Callback):
    """One line per trial event (started, stopped by ASHA, ended, failed) naming the trial by its overrides;
    keeps each trial's Outcome. Tune runs its callbacks in the launching process."""

    def __init__(self, labels: Sequence[str], out_dirs: Sequence[str], metric: str, stopped: dict[str, int]):
        self.labels, self.out_dirs, self.metric, self.stopped = labels, out_dirs, metric, stopped
        self.outcomes: dict[int, Outcome] = {}
        self.last: dict[int, dict] = {}  # each trial's last report
        self.told: set[str] = set()  # trials whose stop was printed

    def on_trial_start(self, iteration, trials, trial, **info):
        i = trial.config["trial"]
        print(f"sweep: {self.labels[i]} started → {self.out_dirs[i]}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        i = trial.config["trial"]
        self.last[i] = result
        if trial.trial_id in self.stopped and trial.trial_id not in self.told:  # the scheduler ran first
            self.told.add(trial.trial_id)
            print(f"sweep: {self.labels[i]} stopped by ASHA at step {result.get('step')}{self._value(result)}, "
                  f"behind the others; it saves a checkpoint and ends", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        i = trial.config["trial"]
        last = self.last.get(i, {})
        status = STOPPED if trial.trial_id in self.stopped else "completed"
        self.outcomes[i] = Outcome(status, last.get("step"), last.get(self.metric))
        print(f"sweep: {self.labels[i]} {status} at step {last.get('step')}{self._value(last)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        i = trial.config["trial"]
        error_file = Path(trial.error_file) if trial.error_file else None
        error = _last_line(error_file.read_text() if error_file and error_file.is_file() else "")
        self.outcomes[i] = Outcome("failed", self.last.get(i, {}).get("step"), error=error or "unknown error")
        print(f"sweep: {self.labels[i]} failed: {self.outcomes[i].error}\n  logs: {self.out_dirs[i]}", flush=True)

    def _value(self, result: dict) -> str:
        value = result.get(self.metric)
        return f", {self.metric} {value:.4f}" if isinstance(value, (int, float)) else ""


def _last_line(text: str) -> str:
    """The exception line of a traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
