"""`ragft serve promote`: load a checkpoint into a running server under a name, gated by evaluation.

  ragft serve promote checkpoint=<folder|best|latest> serve.url=http://host:8000 as=<name> [--force]

The gate compares the `ragft eval` scores of the candidate and of the checkpoint serving under
`<name>` now (what the server's /v1/models says), on `promote.metric` (a registry metric name,
`<system>.<metric>[@<split>]`): the candidate loads only if it is better, in `promote.mode`'s
direction, by at least `promote.min_delta` and by more than nothing. A score is read from the eval
report the registry links to the checkpoint (`report_json`), else from the metrics the registry
recorded. Nothing serving under the name yet: the candidate loads (there is nothing to beat).
`--force` skips the gate and says so. The load goes through POST /v1/adapters with the admin key
(RAGFT_ADMIN_KEY), so it is verified there as any load is; the registry then records which
checkpoint serves under which name at which address, and since when (`ragft.registry.serving`).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ragft import registry
from ragft.checkpoints import resolve_checkpoint
from ragft.config.schema import ServeJobConfig
from ragft.errors import ConfigError, InputError
from ragft.serve.keys import ADMIN_KEY_ENV
from ragft.serve.spec import MODEL_ID


class PromotionRefused(InputError):
    """The gate found the candidate no better than what serves now: nothing was loaded (exit 2)."""

    def message(self, command: str, hint: str = "") -> str:
        return f"ragft {command}: refused, nothing was loaded:\n  {self}\n  (--force loads it anyway)"


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str  # one line: the two scores and the rule


def run_promote(job: ServeJobConfig, say: Callable[[str], None] = print) -> dict:
    """Gate, load and record; the server's answer to the load. ConfigError or PromotionRefused: nothing loaded."""
    p, url = job.promote, (job.serve.url or "").rstrip("/")
    problems = []
    if not url:
        problems.append("serve.url is required: the address of the running server (http://host:port)")
    if not p.name or not MODEL_ID.match(p.name):
        problems.append("as=<name> (promote.name) is required: the served name, 1-128 letters, digits, '.', '_', "
                        "':' or '-'")
    key = next((k.strip() for k in os.environ.get(ADMIN_KEY_ENV, "").split(",") if k.strip()), None)
    if key is None:
        problems.append(f"{ADMIN_KEY_ENV} must hold the server's admin key: loads are admin-only")
    reg = job.registry
    candidate, found = resolve_checkpoint(job.checkpoint, job.train_runs_dir, reg.path, reg.best_metric, reg.best_mode)
    problems += found
    if problems:
        raise ConfigError(problems)
    served = serving_now(url, key, p.name)
    if served is not None and not served.get("runtime"):
        raise ConfigError([f"{p.name} is served since the server started, not loaded at runtime: it cannot be "
                           f"replaced; promote into another name"])
    incumbent = served["checkpoint"] if served else None
    if p.force:
        verdict = Verdict(True, f"--force: the gate on {p.metric} was skipped")
    else:
        verdict = gate(reg.path, candidate, incumbent, p.metric, p.mode, p.min_delta, p.name)
        if not verdict.accepted:
            raise PromotionRefused(verdict.reason)
    say(f"ragft serve promote: {verdict.reason}; loading {candidate} as {p.name} into {url}")
    answer = post_adapter(url, key, p.name, candidate, p.timeout_s)
    registry.record_serving(reg.path, candidate, p.name, url, replaced=incumbent, forced=p.force, metric=p.metric)
    say(f"ragft serve promote: {p.name} now serves {candidate} ({answer['replicas']} replica(s), "
        f"{answer['load_s']:.2f} s); recorded in {reg.path}")
    return answer


def gate(registry_path: str, candidate: str, incumbent: Optional[str], metric: str, mode: str, min_delta: float,
         name: str) -> Verdict:
    """Whether `candidate` may replace `incumbent` (None: nothing serves as `name`) on `metric`."""
    new = score(registry_path, candidate, metric)
    if new is None:
        return Verdict(False, f"{candidate} has no {metric} from `ragft eval` in the registry {registry_path} "
                              f"(run ragft eval checkpoint={candidate})")
    if incumbent is None:
        return Verdict(True, f"nothing serves as {name} yet; {metric}={new:.4f}")
    old = score(registry_path, incumbent, metric)
    if old is None:
        return Verdict(False, f"{incumbent}, serving as {name}, has no {metric} from `ragft eval` in the registry "
                              f"{registry_path}: nothing to compare with")
    gain = new - old if mode == "max" else old - new
    verb = "beats" if gain > 0 and gain >= min_delta else "does not beat"
    better = "higher" if mode == "max" else "lower"
    return Verdict(verb == "beats", f"{metric}: candidate {new:.4f} {verb} serving {old:.4f} by "
                                    f"promote.min_delta={min_delta} ({better} is better; gain {gain:+.4f})")


def score(registry_path: str, checkpoint: str, metric: str) -> Optional[float]:
    """`metric` of `checkpoint` from its eval report (the registry's report_json link), else the registry's record."""
    entry = next((e for e in registry.entries(registry_path) if e.checkpoint == str(Path(checkpoint).resolve())),
                 None)
    if entry is None:
        return None
    report = entry.links.get("report_json")
    if report and Path(report).is_file():
        value = metric_in_report(json.loads(Path(report).read_text()), metric)
        if value is not None:
            return value
    value = entry.metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def metric_in_report(report: dict, metric: str) -> Optional[float]:
    """`<system>.<metric>[@<split>]` in a `ragft eval` report.json (`metrics[split][system][metric]`)."""
    name, _, split = metric.partition("@")
    system, _, key = name.partition(".")
    value = report.get("metrics", {}).get(split or "all", {}).get(system, {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def serving_now(url: str, key: str, name: str) -> Optional[dict]:
    """The server's /v1/models entry for `name`, or None when it serves no such model."""
    models = request_json("GET", f"{url}/v1/models", key, timeout=30)["data"]
    return next((m for m in models if m["id"] == name), None)


def post_adapter(url: str, key: str, name: str, checkpoint: str, timeout: float) -> dict:
    return request_json("POST", f"{url}/v1/adapters", key, {"name": name, "checkpoint": checkpoint}, timeout)


def request_json(method: str, url: str, key: str, body: Optional[dict] = None, timeout: float = 60) -> dict:
    """One JSON call to the server; a 4xx is bad input (ConfigError, the server's message), anything else fails."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = err.reason
        if 400 <= err.code < 500:
            raise ConfigError([f"{method} {url}: {err.code} {message}"]) from None
        raise RuntimeError(f"{method} {url}: {err.code} {message}") from None
    except urllib.error.URLError as err:
        raise ConfigError([f"serve.url: cannot reach {url}: {err.reason}"]) from None
