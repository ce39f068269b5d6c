"""The report of `ragft eval`: report.json (the result, whole), report.md (tables a person reads) and
report.png (exact match per split and system), and the same table and chart on a W&B run.

Everything here reads the plain result dict that `ragft.eval.run.build_result` makes, so a report
can be re-rendered from an old report.json without a model. The best value of each metric is bold;
"best" knows which way each metric points (perplexity, latency and stale answers are better low),
token counts are informational and never best, and None (a metric a system cannot have, such as
recall without retrieval) is shown as "–" and is never best.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from ragft.eval.metrics import finite

SPLITS = ("all", "unchanged", "changed")  # report order; a split the result lacks is skipped
COLUMNS = ("exact_match", "token_f1", "contains", "stale", "perplexity", "recall_at_k", "mrr",
           "citation_accuracy", "latency_mean_s", "latency_p95_s", "tokens_mean")
HIGHER_IS_BETTER = frozenset({"exact_match", "token_f1", "contains", "recall_at_k", "mrr", "citation_accuracy"})
LOWER_IS_BETTER = frozenset({"perplexity", "latency_mean_s", "latency_p95_s", "stale"})
RATES = HIGHER_IS_BETTER | {"stale"}
TITLES = {"exact_match": "exact match", "token_f1": "token F1", "contains": "contains", "stale": "stale",
          "perplexity": "perplexity", "recall_at_k": "recall@k", "mrr": "MRR", "citation_accuracy": "citation acc.",
          "latency_mean_s": "latency mean (ms)", "latency_p95_s": "latency p95 (ms)", "tokens_mean": "tokens mean"}
COLORS = {"base": "tab:blue", "base_rag": "tab:orange", "ft": "tab:green", "ft_rag": "tab:red"}  # same in every report
DISAGREEMENTS_SHOWN = 30  # report.md lists this many; the total is stated above the table
CELL_CHARS = 120  # answers can run to max_tokens; a table cell longer than this is cut with "…"
DASH = "–"


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.png into out_dir; return {"json": path, "md": path, "png": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    # json first: it holds everything, so a failure in rendering still leaves the scores on disk
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(result), encoding="utf-8")
    paths["png"].write_bytes(render_png(result))
    return paths


def log_to_wandb(result: dict, run) -> None:
    """Log the same table and chart to an open wandb run (run = wandb.init(...) object).

    Logged in one step: `metrics/<split>` (a wandb.Table of systems × metrics per split),
    `report/chart` (report.png), `report/disagreements` (the questions where exact match differs).
    Summary: `<system>.<metric>` for split all and `<system>.<metric>@<split>` for the others (the
    names the registry records), plus `conclusions`. Works the same offline.
    """
    import wandb
    from PIL import Image

    logged = {}
    for split in _splits(result):
        table = result["metrics"][split]
        metrics = _metric_keys(table)
        rows = [[system, *(finite(table.get(system, {}).get(m)) for m in metrics)] for system in _systems(result)]
        logged[f"metrics/{split}"] = wandb.Table(columns=["system", *metrics], data=rows)
        suffix = "" if split == "all" else f"@{split}"
        for system in _systems(result):
            for metric, value in table.get(system, {}).items():
                if finite(value) is not None:
                    run.summary[f"{system}.{metric}{suffix}"] = value
    logged["report/chart"] = wandb.Image(Image.open(io.BytesIO(render_png(result))), caption="exact match by split")
    logged["report/disagreements"] = _disagreement_table(result)
    run.log(logged)
    if result.get("conclusions"):
        run.summary["conclusions"] = "\n".join(result["conclusions"])


def best_per_metric(table: dict[str, dict[str, float | None]]) -> dict[str, set[str]]:
    """metric -> the systems with the best value of it (ties: all of them), for metrics that have a direction.

    `table` is system -> metric -> value (one split of `result["metrics"]`). A metric no system has a
    finite value for is left out; informational metrics (token counts) are never included.
    """
    best: dict[str, set[str]] = {}
    metrics = {m for row in table.values() for m in row if m in HIGHER_IS_BETTER | LOWER_IS_BETTER}
    for metric in metrics:
        values = {s: v for s, row in table.items() if (v := finite(row.get(metric))) is not None}
        if not values:
            continue
        top = (max if metric in HIGHER_IS_BETTER else min)(values.values())
        # means of the same 0/1 scores summed in another order can differ in the last bit: that is a tie
        best[metric] = {s for s, v in values.items() if math.isclose(v, top, rel_tol=1e-9, abs_tol=1e-12)}
    return best


def disagreements(result: dict, limit: int = DISAGREEMENTS_SHOWN) -> list[dict]:
    """The questions (as in `result["questions"]`) where the systems' exact_match differ, at most `limit`:
    changed questions first, then the rest, each group in file order."""
    return _all_disagreements(result)[:limit]


def render_markdown(result: dict) -> str:
    """report.md: meta, conclusions, a table per split with the best values bold, then the disagreements."""
    lines = ["# ragft eval report", ""]
    lines += [f"- {key}: {_meta_value(value)}" for key, value in result.get("meta", {}).items()]
    if result.get("conclusions"):
        lines += ["", "## conclusions", ""] + [f"- {c}" for c in result["conclusions"]]
    for split in _splits(result):
        size = result.get("split_sizes", {}).get(split)
        lines += ["", f"## {split} questions" + (f" ({size})" if size is not None else ""), ""]
        lines += _metrics_table(result, split)
    lines += ["", "## where the systems disagree", ""] + _disagreement_section(result)
    return "\n".join(lines) + "\n"


def render_png(result: dict) -> bytes:
    """report.png as bytes: exact match, then token F1 (or contains); a group of bars per split, a bar per system."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    splits, systems = _splits(result), _systems(result)
    second = "token_f1" if _any_value(result, "token_f1") else "contains"
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    n = result.get("meta", {}).get("n_questions") or result.get("split_sizes", {}).get("all")
    fig.suptitle("ragft eval" + (f": {n} questions" if n is not None else ""))
    width = 0.8 / max(1, len(systems))
    for ax, metric in zip(fig.subplots(1, 2), ("exact_match", second)):
        for i, system in enumerate(systems):
            values = [finite(result["metrics"][s].get(system, {}).get(metric)) for s in splits]
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(splits))]
            bars = ax.bar(xs, [math.nan if v is None else v for v in values], width, label=system,
                          color=COLORS.get(system, f"C{4 + i}"))
            ax.bar_label(bars, labels=[DASH if v is None else f"{v:.2f}" for v in values], fontsize=7, padding=1)
        sizes = result.get("split_sizes", {})
        ax.set_xticks(range(len(splits)), [f"{s} ({sizes[s]})" if s in sizes else s for s in splits])
        ax.set_ylim(0, 1.08)  # headroom for the value labels above a bar of 1.0
        ax.set_ylabel(TITLES[metric])
        ax.set_title(f"{TITLES[metric]} by split")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, title="system", fontsize=8, loc="outside right upper")  # off the bars
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _metrics_table(result: dict, split: str) -> list[str]:
    table, systems = result["metrics"][split], _systems(result)
    columns = [m for m in COLUMNS if any(finite(table.get(s, {}).get(m)) is not None for s in systems)]
    if not columns:
        return ["no scores"]
    best = best_per_metric({s: table.get(s, {}) for s in systems})
    k = result.get("meta", {}).get("k")
    titles = [TITLES[m].replace("@k", f"@{k}") if k else TITLES[m] for m in columns]
    lines = ["| system | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(columns)]
    for system in systems:
        cells = []
        for metric in columns:
            text = _format(metric, table.get(system, {}).get(metric))
            cells.append(f"**{text}**" if system in best.get(metric, ()) else text)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def _disagreement_section(result: dict) -> list[str]:
    every = _all_disagreements(result)
    if not every:
        return ["The systems agree on exact match for every question."]
    shown, systems = every[:DISAGREEMENTS_SHOWN], _systems(result)
    note = f"{len(every)} questions where the systems' exact match differs"
    note += f"; the first {len(shown)} are shown" if len(shown) < len(every) else ""
    lines = [note + " (changed questions first; ✓ exact match, ✗ not).", ""]
    with_old = any(q.get("old_answer") is not None for q in shown)
    header = ["id", "question", "reference answer"] + (["old answer"] if with_old else []) + systems
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for q in shown:
        cells = [_cell(q.get("id")), _cell(q.get("question")), _cell(q.get("answer"))]
        cells += [_cell(q.get("old_answer"))] if with_old else []
        for system in systems:
            answer = q.get("answers", {}).get(system)
            cells.append(DASH if answer is None else f"{_mark(answer.get('exact_match'))} {_cell(answer.get('text'))}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _disagreement_table(result: dict):
    import wandb

    systems = _systems(result)
    columns = ["id", "question", "answer", "old_answer", "changed"]
    columns += [c for s in systems for c in (f"{s}.text", f"{s}.exact_match")]
    rows = []
    for q in _all_disagreements(result):
        row = [q.get("id"), q.get("question"), q.get("answer"), q.get("old_answer"), q.get("changed")]
        for system in systems:
            answer = q.get("answers", {}).get(system) or {}
            row += [answer.get("text"), answer.get("exact_match")]
        rows.append(row)
    return wandb.Table(columns=columns, data=rows)


def _all_disagreements(result: dict) -> list[dict]:
    systems = _systems(result)
    found = []
    for q in result.get("questions", []):
        scores = {finite((q.get("answers", {}).get(s) or {}).get("exact_match")) for s in systems} - {None}
        if len(scores) > 1:
            found.append(q)
    return [q for q in found if q.get("changed") is True] + [q for q in found if q.get("changed") is not True]


def _splits(result: dict) -> list[str]:
    present = result.get("metrics", {})
    return [s for s in SPLITS if s in present] + [s for s in present if s not in SPLITS]


def _systems(result: dict) -> list[str]:
    if result.get("systems"):
        return list(result["systems"])
    return list(dict.fromkeys(s for table in result.get("metrics", {}).values() for s in table))


def _metric_keys(table: dict) -> list[str]:
    """COLUMNS first, then whatever else the systems report (tokens_total, ...), in first-seen order."""
    seen = list(dict.fromkeys(m for row in table.values() for m in row))
    return [m for m in COLUMNS if m in seen] + [m for m in seen if m not in COLUMNS]


def _any_value(result: dict, metric: str) -> bool:
    return any(finite(row.get(metric)) is not None for table in result.get("metrics", {}).values()
               for row in table.values())


def _format(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if metric in RATES:
        return f"{value:.3f}"
    if metric == "perplexity":
        return f"{value:.1f}" if value >= 1000 else f"{value:.2f}"
    if metric.startswith("latency"):
        return f"{value * 1000:.1f}"
    if metric.startswith("tokens"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _meta_value(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _mark(exact_match) -> str:
    score = finite(exact_match)
    return "?" if score is None else ("✓" if score >= 1 else "✗")


def _cell(text) -> str:
    """Text that stays inside one Markdown table cell: pipes escaped, line breaks as <br>, cut to CELL_CHARS."""
    if text is None:
        return DASH
    text = str(text).strip()
    if not text:
        return "(empty)"
    if len(text) > CELL_CHARS:
        text = text[:CELL_CHARS - 1].rstrip() + "…"
    text = text.replace("\\", "\\\\").replace("|", "\\|")  # backslashes first, so "\\|" cannot unescape a pipe
    return text.replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")
