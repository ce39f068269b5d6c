"""The driver's preparation before any worker starts (ragft.train.run.prepare_model / prepare_data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragft.errors import ConfigError
from ragft.sample import sample_path
from ragft.train.run import prepare_data, prepare_model
from ragft.train.spec import validate_train


def test_fewer_eval_rows_than_workers_is_a_config_error(compose_train, tmp_path):
    """Ray splits eval rows equally over the workers: with fewer rows than workers every shard would be empty
    and the eval loss NaN, so the run is refused before the workers start."""
    rows = Path(sample_path("train.jsonl")).read_text().splitlines()[:20]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    spec = validate_train(compose_train("data=jsonl", f"data.train_path={tmp_path / 'train.jsonl'}",
                                        "data.packing=false", "data.eval_fraction=0.05", "cluster.num_workers=2",
                                        "train.micro_batch_size=1", "train.global_batch_size=2"))
    spec, tokenizer = prepare_model(spec)
    with pytest.raises(ConfigError, match="no worker would get one; raise data.eval_fraction"):
        prepare_data(spec, tokenizer)


def test_global_batch_defaults_to_micro_times_workers_times_accumulation(compose_train):
    spec = validate_train(compose_train("cluster.num_workers=3", "train.micro_batch_size=4"))
    assert spec.train.global_batch_size is None and (spec.grad_accum, spec.global_batch_size) == (1, 12)
    spec = validate_train(compose_train("cluster.num_workers=3", "train.micro_batch_size=4", "train.grad_accum=2"))
    assert (spec.grad_accum, spec.global_batch_size) == (2, 24)
    spec = validate_train(compose_train("cluster.num_workers=3", "train.micro_batch_size=4",
                                        "train.global_batch_size=36"))
    assert spec.grad_accum == 3


def test_a_global_batch_that_does_not_divide_names_the_values_that_would(compose_train):
    with pytest.raises(ConfigError) as info:
        validate_train(compose_train("cluster.num_workers=3", "train.micro_batch_size=4",
                                     "train.global_batch_size=16"))
    assert info.value.problems == [
        "train.global_batch_size=16 is not divisible by train.micro_batch_size × cluster.num_workers = 4 × 3 = 12: "
        "use a multiple of 12 (12, 24, 36, ...), or leave it unset (null) for 12 × train.grad_accum"]
    with pytest.raises(ConfigError) as info:
        validate_train(compose_train("train.micro_batch_size=4", "train.global_batch_size=16", "train.grad_accum=3"))
    assert "train.grad_accum=3 contradicts train.global_batch_size=16" in info.value.problems[0]
