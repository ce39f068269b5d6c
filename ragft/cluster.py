"""Where Ray comes from: the embedded local Ray by default, or an existing cluster's address.

Every command that uses Ray (train, sweep, index's embedding workers, eval, serve) connects through `init_ray`,
so they all share one embedded Ray when one process runs several of them (`ragft demo`, the tests).
"""

from __future__ import annotations

import os


# Read by the processes the embedded Ray starts, which inherit this one's environment. Ray Train's controller
# polls its workers every 2 s: a short job waits up to that to start and again to end; polling local workers
# more often is cheap. A cluster keeps its own setting.
EMBEDDED_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def init_ray(address: str | None, cpus_needed: int = 0, dashboard: bool | None = None) -> None:
    """Connect to `address`, or start an embedded local Ray with at least `cpus_needed` logical CPUs
    (reused when this process already has one) and, if `dashboard` says so, its dashboard (None: Ray's choice)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.update({k: v for k, v in EMBEDDED_RAY_ENV.items() if k not in os.environ})
        # Logical CPUs, not cores: actors and Ray Data's own tasks need theirs even on a 2-core machine.
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed), log_to_driver=True, configure_logging=False,
                 include_dashboard=dashboard)
