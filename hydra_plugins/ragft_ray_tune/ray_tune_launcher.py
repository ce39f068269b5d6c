"""`ragft train -m hydra/launcher=ray_tune key=a,b ...`: every combination a Ray Tune trial (ragft.sweep.tune).

Hydra's basic sweeper expands the overrides into jobs; this launcher gives each job what Hydra's own
launchers give it (the folder `<hydra.sweep.dir>/<num>/` with .hydra/config.yaml, hydra.yaml and
overrides.yaml; the job callbacks) and what makes it a ragft trial (ragft.sweep.trial.as_trial: that
folder as out_dir, the sweep's W&B group), validates every trial, then runs them all in one Tuner. It
returns to the sweeper like any launcher, so Hydra then calls the multirun callbacks
(ragft.sweep.report.SweepReport writes sweep.json and sweep.md).

Ray is imported only when a sweep is launched: Hydra imports this module whenever it scans for plugins.
No `from __future__ import annotations`: Hydra's scan runs the module without entering it in sys.modules,
and dataclasses then cannot resolve string annotations.
"""

import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


@dataclass
class RayTuneLauncherConf:
    # No settings here: how trials run and stop is the ragft config's `sweep:` group (conf/train.yaml).
    _target_: str = "hydra_plugins.ragft_ray_tune.ray_tune_launcher.RayTuneLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="ray_tune", node=RayTuneLauncherConf, provider="ragft")


@dataclass
class Job:
    """One job of the sweep, composed as Hydra's launchers compose it."""

    num: int
    overrides: list[str]
    config: DictConfig  # with the hydra node, as the job callbacks receive it
    task_cfg: DictConfig  # without it: what `ragft train`'s task function would receive
    trial_cfg: DictConfig  # task_cfg as a trial: out_dir = the job folder, W&B group = the sweep
    out_dir: str


class RayTuneLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ragft.exit_codes import run_command
        from ragft.sweep import tune

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        sweep_dir = str(self.config.hydra.sweep.dir)
        sweep = OmegaConf.to_object(self.config.sweep)
        jobs = [self._compose(list(overrides), initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        labels = trial_labels([job.num for job in jobs], [job.overrides for job in jobs])
        outcomes: list = []

        def body() -> None:
            specs = tune.validate_trials([job.trial_cfg for job in jobs], labels, sweep)  # before anything runs
            print(f"sweep: {len(jobs)} trials on Ray Tune, {sweep.max_concurrent} at once, scheduler "
                  f"{sweep.scheduler} → {sweep_dir}", flush=True)
            for job in jobs:
                self._save_job_config(job)
                self.hydra_context.callbacks.on_job_start(config=job.config, task_function=self.task_function)
            outcomes.extend(tune.run_trials(specs, labels, sweep, sweep_dir))
            failed = [label for label, outcome in zip(labels, outcomes) if outcome.status == "failed"]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(jobs)} trials failed ({'; '.join(failed)}); "
                                   f"the others are ranked in {Path(sweep_dir) / 'sweep.md'}")

        # The exit status and the message on stderr of `ragft train`, as its task function sets them for
        # each job of the other launchers (which call it; this one runs trials remotely instead).
        code = run_command("train", body, sweep_dir)
        if not outcomes:  # nothing ran: a bad config (2, every problem listed) or Ray/Tune failed to start (1)
            sys.exit(code)
        returns = []
        for job, outcome in zip(jobs, outcomes):
            ret = self._job_return(job, outcome)
            self.hydra_context.callbacks.on_job_end(config=job.config, job_return=ret)
            returns.append(ret)
        return returns

    def _compose(self, overrides: list[str], num: int) -> Job:
        """The job's config and folder, as hydra.core.utils.run_job derives them."""
        assert self.config is not None and self.hydra_context is not None
        from ragft.sweep.trial import as_trial

        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        previous = HydraConfig.instance().cfg
        try:
            HydraConfig.instance().set_config(config)  # the sweep dir and subdir may read ${hydra:...}
            out_dir = os.path.abspath(os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)))
            with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
                config.hydra.runtime.output_dir = out_dir
            HydraConfig.instance().set_config(config)
        finally:
            HydraConfig.instance().cfg = previous
        task_cfg = copy.deepcopy(config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        trial_cfg = as_trial(task_cfg, out_dir, str(self.config.hydra.sweep.dir))
        return Job(num, overrides, config, task_cfg, trial_cfg, out_dir)

    @staticmethod
    def _save_job_config(job: Job) -> None:
        """.hydra/{config,hydra,overrides}.yaml in the job folder, as Hydra writes them for every job."""
        subdir = job.config.hydra.output_subdir
        if subdir is None:
            return
        folder = Path(job.out_dir) / str(subdir)
        folder.mkdir(parents=True, exist_ok=True)
        hydra_cfg = OmegaConf.masked_copy(job.config, "hydra")
        for name, node in (("config.yaml", job.task_cfg), ("hydra.yaml", hydra_cfg),
                           ("overrides.yaml", job.config.hydra.overrides.task)):
            (folder / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")

    @staticmethod
    def _job_return(job: Job, outcome: Any) -> JobReturn:
        # COMPLETED even for a failed trial, as `ragft train`'s own task function returns for a failed job
        # (it reports instead of raising): a FAILED return makes the sweeper raise, and then Hydra skips
        # the multirun callbacks, i.e. sweep.md. The failure is in the outcome, status.json and exit code.
        result = Path(job.out_dir) / "result.json"
        return JobReturn(
            overrides=job.overrides,
            cfg=job.task_cfg,
            hydra_cfg=OmegaConf.masked_copy(job.config, "hydra"),
            working_dir=os.getcwd(),
            task_name=str(job.config.hydra.job.name),
            status=JobStatus.COMPLETED,
            _return_value={"status": outcome.status, "step": outcome.step, "value": outcome.value,
                           "error": outcome.error, "result": str(result) if result.is_file() else None},
        )


def trial_labels(nums: Sequence[int], overrides: Sequence[Sequence[str]]) -> list[str]:
    """`trial <num> [the overrides that differ between trials]` (all the job's overrides when none do)."""
    from ragft.sweep.trial import differing

    own = [list(filter_overrides(job)) for job in overrides]
    _, others = differing(own)
    return [f"trial {num} [{' '.join(shown or mine)}]" for num, shown, mine in zip(nums, others, own)]
