"""`ragft train resume=<out_dir|latest>`: continue a run with the config it was started with.

The run's own `.hydra/overrides.yaml` is replayed first and the new command line goes on
top, so `resume=runs/train/X` alone continues X exactly as it was configured, while
`resume=... train.max_steps=500` extends it. The worker loop then picks the newest
checkpoint whose sha256 matches its manifest (ragft.train.loop.resume_state).
"""

from __future__ import annotations

from pathlib import Path

import yaml

DEFAULT_RUNS_DIR = "runs/train"


def expand_resume(args: list[str]) -> list[str]:
    """Command-line overrides with a `resume=` expanded into the resumed run's own overrides."""
    value = _value(args, "resume")
    if value is None or value in ("null", "None"):
        return args
    run_dir = resolve_run_dir(value, _value(args, "runs_dir") or DEFAULT_RUNS_DIR)
    saved = run_dir / ".hydra" / "overrides.yaml"
    previous = yaml.safe_load(saved.read_text()) if saved.is_file() else []
    merged: dict[str, str] = {}
    for arg in [*previous, *args, f"out_dir={run_dir}", f"resume={run_dir}"]:
        if arg.startswith("-"):  # flags such as --cfg stay as they are, after the overrides
            continue
        merged[override_key(arg)] = arg  # the newest value of each key wins
    return list(merged.values()) + [a for a in args if a.startswith("-")]


def resolve_run_dir(value: str, runs_dir: str) -> Path:
    """`latest` is the newest run under runs_dir that got as far as writing its spec."""
    if value != "latest":
        return Path(value).resolve()
    runs = [p for p in Path(runs_dir).glob("*") if (p / "spec.json").is_file()]
    if not runs:
        return Path(runs_dir).resolve() / "no-run-to-resume"  # validation reports it
    return max(runs, key=lambda p: (p / "spec.json").stat().st_mtime).resolve()


def _value(args: list[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in args if override_key(a) == key and "=" in a]
    return found[-1] if found else None


def override_key(arg: str) -> str:
    """The key a command-line override sets: `+a.b=1` → `a.b`."""
    return arg.split("=", 1)[0].lstrip("+~")
