"""One home for each default: no YAML value under ragft/conf restates the typed schema's default, and closed
choices are refused at compose with the allowed values listed.

Each primary config's defaults list names its schema (registered by `register_configs`) and the config groups it
composes; a group option merges into the schema's section of the same name, so its values are compared with that
section's defaults. The `hydra` section is Hydra's own, not ragft's schema.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from enum import Enum
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ragft.config.compose import CONF_DIR, compose_config
from ragft.config.schema import register_configs

CONF = Path(CONF_DIR)
NOT_SCHEMA = {"defaults", "hydra"}


def schema_class(name: str) -> type:
    """The dataclass `register_configs` stored under `name`."""
    register_configs()
    return OmegaConf.get_type(ConfigStore.instance().load(f"{name}.yaml").node)


def primaries() -> dict[str, tuple[type, list[str]]]:
    """Each primary YAML file: its schema class and the config groups its defaults list composes."""
    found = {}
    for path in sorted(CONF.glob("*.yaml")):
        defaults = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("defaults", [])
        schemas = [d for d in defaults if isinstance(d, str) and d.endswith("_schema")]
        groups = [next(iter(d)) for d in defaults if isinstance(d, dict)]
        assert len(schemas) == 1, f"{path.name}: its defaults list names no schema (or several)"
        found[path.name] = (schema_class(schemas[0]), groups)
    return found


def field_types(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def default_of(field: dataclasses.Field) -> typing.Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def section(cls: type, key: str) -> type:
    """The dataclass of `cls`'s field `key` (a group's section)."""
    return field_types(cls)[key]


def restated(data: dict, cls: type, where: str) -> tuple[list[str], int]:
    """The leaves of `data` equal to `cls`'s defaults (as "file: key=value"), and the number of leaves."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    found, leaves = [], 0
    for key, value in data.items():
        assert key in fields, f"{where}{key}: not a key of {cls.__name__}"
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            more, n = restated(value, kind, f"{where}{key}.")
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
            more, n = [], 0
            for name, item in value.items():  # e.g. demo recipes: each one against the recipe's defaults
                m, k = restated(item, typing.get_args(kind)[1], f"{where}{key}.{name}.")
                more, n = more + m, n + k
        else:
            default = default_of(fields[key])
            more, n = ([f"{where}{key}={value!r}"] if same(value, default) else []), 1
        found, leaves = found + more, leaves + n
    return found, leaves


def same(value: typing.Any, default: typing.Any) -> bool:
    if default is MISSING or default == "???":
        return value == "???"
    if isinstance(default, Enum):
        default = default.value
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    return value == default


def yaml_leaves_equal_to_defaults() -> tuple[list[str], int]:
    """Every YAML leaf under ragft/conf equal to its schema default, and the number of leaves walked."""
    found, leaves = [], 0
    tops = primaries()
    for name, (cls, _) in tops.items():
        data = OmegaConf.to_container(OmegaConf.load(CONF / name), resolve=False)
        data = {k: v for k, v in data.items() if k not in NOT_SCHEMA}
        more, n = restated(data, cls, f"{name}: ")
        found, leaves = found + more, leaves + n
    for path in sorted(CONF.glob("*/*.yaml")):
        group = path.parent.name
        users = {section(cls, group) for cls, groups in tops.values() if group in groups}
        assert len(users) == 1, f"{group}: composed by no primary config (or into different schemas)"
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        more, n = restated(data, users.pop(), f"{group}/{path.name}: ")
        found, leaves = found + more, leaves + n
    return found, leaves


def test_no_yaml_value_restates_its_schema_default():
    """A schema default changed must change every config: no YAML file may pin the same value."""
    found, leaves = yaml_leaves_equal_to_defaults()
    assert leaves > 50  # the walk reached the files
    assert not found, f"{len(found)} of {leaves} YAML values equal their schema default:\n" + "\n".join(found)


def test_the_walk_sees_every_group_option_and_finds_a_restated_value(tmp_path, monkeypatch):
    """The check itself: a value equal to its default in a group option is found."""
    import tests.config.test_defaults as me

    conf = tmp_path / "conf"
    for path in CONF.rglob("*.yaml"):
        (conf / path.relative_to(CONF)).parent.mkdir(parents=True, exist_ok=True)
        (conf / path.relative_to(CONF)).write_text(path.read_text())
    (conf / "cluster" / "slurm.yaml").write_text((conf / "cluster" / "slurm.yaml").read_text() + "ray_port: 6379\n")
    monkeypatch.setattr(me, "CONF", conf)
    found, _ = yaml_leaves_equal_to_defaults()
    assert found == ["cluster/slurm.yaml: ray_port=6379"]


def compose_error(*args: str) -> str:
    """stderr of `ragft <args> --cfg job`, which must exit 2 (a bad config)."""
    run = subprocess.run([sys.executable, "-m", "ragft", *args, "--cfg", "job"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    return run.stderr


def test_a_wrong_closed_choice_is_refused_at_compose_with_the_allowed_values():
    err = compose_error("train", "cluster.name=k8s")
    assert "Invalid value 'k8s', expected one of [local, ray, slurm]" in err and "cluster.name" in err, err


@pytest.mark.parametrize("override,allowed", [
    ("cluster.name=k8s", ["local", "ray", "slurm"]),
    ("strategy.precision=fp8", ["auto", "bf16", "fp32"]),
    ("retrieval.mode=sparse", ["dense", "bm25", "hybrid"]),
    ("tracking.mode=sometimes", ["online", "offline", "disabled"]),
    ("data.on_bad_row=ignore", ["error", "skip"]),
    ("model.kernels=triton", ["none", "ragft", "liger"]),
    ("serve.dtype=fp8", ["auto", "float32", "bfloat16", "float16"]),
    ("eval.dtype=fp8", ["auto", "float32", "bfloat16", "float16"]),
    ("serve.engine=tgi", ["transformers", "vllm"]),
])
def test_compose_lists_the_allowed_values_of_an_enum_key(override, allowed):
    config = {"retrieval": "index", "serve": "serve", "eval": "eval"}.get(override.split(".")[0], "train")
    with pytest.raises(Exception) as error:
        compose_config(config, [override])
    message = f"{error.value} {error.value.__cause__}"  # Hydra's "Error merging override" wraps OmegaConf's
    assert "expected one of" in message and override.split("=")[1] in message, message
    assert all(a in message for a in allowed), message


def test_a_config_group_option_that_does_not_exist_is_refused_with_the_options():
    err = compose_error("train", "strategy=zero4")
    assert "zero4" in err
    assert all(o in err for o in ("ddp", "zero1", "zero2", "zero3", "zero3_offload")), err


def test_enum_values_come_out_as_plain_strings():
    """Code compares them with strings, and spec.json / manifests / --cfg job hold plain strings."""
    from ragft.train.spec import spec_summary, validate_train

    cfg = compose_config("train", ["strategy.precision=fp32", "cluster.name=local"])
    assert cfg.cluster.name == "local" and cfg.strategy.precision == "fp32"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert plain["cluster"]["name"] == "local" and type(plain["cluster"]["name"]) is str
    assert "!!python" not in OmegaConf.to_yaml(cfg)
    spec = validate_train(cfg)
    assert type(spec.strategy.precision) is str and type(spec.cluster.name) is str and type(spec.model.kernels) is str
    assert type(spec.resolved_config["strategy"]["precision"]) is str
    assert '"precision": "fp32"' in json.dumps(spec_summary(spec)["strategy"])
