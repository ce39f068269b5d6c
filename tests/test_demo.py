"""`ragft demo model=tiny` end to end through the CLI, on a smaller handbook: what a tiny model trained from
scratch learns, pinned with a margin.

The run is the tiny recipe of the demo's config with fewer ferries (`sample_docs`) so that it fits the
suite's time; `make demo` runs the SmolLM2 recipe (figures in the README). Training on CPU is
deterministic for a fixed seed up to float summation order, hence margins rather than exact figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ragft import registry

pytestmark = pytest.mark.ray

DOCS, EPOCHS = 24, 6  # ragft demo model=tiny: 80 ferries, 4 epochs (README); a smaller handbook fits the suite


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run = subprocess.run([sys.executable, "-m", "ragft", "demo", "model=tiny", f"out_dir={out}",
                          f"sample_docs={DOCS}", f"epochs={EPOCHS}", f"registry_path={out / 'registry.jsonl'}"],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout, json.loads((out / "demo.json").read_text())


def test_demo_writes_every_artifact_and_prints_the_serve_command(demo):
    out, stdout, summary = demo
    for stage in range(1, 9):
        assert f"ragft demo [{stage}/8]" in stdout
    for path in ("report.md", "index/manifest.json", "data/raft.jsonl", "train/result.json",
                 "eval_original/report.md", "eval_original/report.png", "eval_updated/report.json"):
        assert (out / path).is_file(), path
    assert json.loads((out / "index" / "manifest.json").read_text())["version"] == 2  # updated in place
    assert f"ragft serve checkpoint=best registry.path={out / 'registry.jsonl'}" in stdout
    best = registry.resolve(out / "registry.jsonl", "best", "ft_rag.token_f1")
    assert best.checkpoint == summary["checkpoint"] and "ft_rag.exact_match@changed" in best.metrics


def test_fine_tuning_memorises_the_handbook(demo):
    _, _, summary = demo
    original = summary["evals"]["original"]["metrics"]["all"]
    updated = summary["evals"]["updated"]["metrics"]
    unchanged, changed = updated["unchanged"], updated["changed"]
    # the random base knows nothing and cannot read
    assert original["base"]["exact_match"] == 0 and original["base_rag"]["exact_match"] == 0
    # fine-tuning memorises the handbook: unchanged facts, asked in a phrasing never trained on
    assert unchanged["ft"]["exact_match"] >= PINNED["ft_unchanged_em"] - MARGIN
    assert unchanged["ft"]["exact_match"] > unchanged["base"]["exact_match"]
    assert unchanged["ft"]["perplexity"] < unchanged["base"]["perplexity"] / 50
    # after the update the fine-tuned model alone answers what was true at training time
    assert changed["ft"]["stale"] >= PINNED["ft_changed_stale"] - MARGIN
    # the demo's report states both with the numbers
    report = (summary["evals"]["updated"]["report"])
    assert f"unchanged facts: ft beats base (exact match {unchanged['ft']['exact_match']:.3f} vs 0.000)" in \
        open(report).read()


def test_with_retrieval_answers_follow_the_updated_documents(demo):
    _, _, summary = demo
    changed = summary["evals"]["updated"]["metrics"]["changed"]
    # the fine-tuned model alone cannot know a value written after training; with retrieval it copies it
    assert changed["ft"]["exact_match"] == 0
    assert changed["ft_rag"]["exact_match"] >= PINNED["ft_rag_changed_em"] - ONE_CHANGED
    # and what it answered from memory before the update is gone once the updated chunk is in the prompt
    assert changed["ft_rag"]["stale"] <= changed["ft"]["stale"] - 0.5
    report = open(summary["evals"]["updated"]["report"]).read()
    assert (f"with retrieval, answers follow the updated documents: ft_rag {changed['ft_rag']['exact_match']:.3f} "
            f"vs ft 0.000 exact match on changed facts") in report


# Measured with DOCS, EPOCHS above (2026-11-25, 2 cores, 227 s): 25 unchanged and 13 changed questions (one
# is 0.04 / 0.077); the margins allow a question or two of drift in float summation order.
MARGIN = 0.15
ONE_CHANGED = 0.08
PINNED = {"ft_unchanged_em": 0.80, "ft_changed_stale": 0.80, "ft_rag_changed_em": 0.23}


def test_bad_stage_overrides_fail_before_anything_runs(tmp_path):
    from ragft.config.compose import compose_config
    from ragft.errors import ConfigError
    from ragft.demo import run_demo

    cfg = compose_config("demo", ["model=tiny", f"out_dir={tmp_path}", "train=['train.no_such_key=1']",
                          "eval=['eval.batch_size=many']"])
    with pytest.raises(ConfigError) as err:
        run_demo(cfg, progress=lambda line: None)
    assert "train.no_such_key" in str(err.value) and "eval.batch_size" in str(err.value)
    assert not (tmp_path / "index").exists()


def test_a_model_without_a_recipe_is_refused_before_anything_runs(tmp_path):
    from ragft.config.compose import compose_config
    from ragft.errors import ConfigError
    from ragft.demo import run_demo

    with pytest.raises(ConfigError, match="recipes for smollm2, tiny"):
        run_demo(compose_config("demo", ["model=local", f"out_dir={tmp_path}"]), progress=lambda line: None)
    assert not any(tmp_path.iterdir())
