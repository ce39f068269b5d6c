"""cluster=slurm: the sbatch script ragft renders, and real jobs on a local single-node Slurm.

The Slurm jobs run the same `ragft train` job as everywhere else, inside a Ray cluster the script starts
in the allocation; the preemption test sends the time-limit warning (USR1) the way Slurm would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.slurm import job_state, start_local_slurm, wait_until
from helpers.wandb_offline import read_offline_run
from ragft.config.resolvers import time_minutes
from ragft.errors import ConfigError
from ragft.jsonl import read_rows
from ragft.train.slurm import render
from ragft.train.spec import validate_train

CPU_SLURM = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.use_gpu=false", "cluster.num_workers=2",
             "cluster.cpus_per_worker=1", "cluster.cpus_per_task=4"]


@pytest.mark.parametrize("value, minutes", [("90", 90), ("10:30", 11), ("04:00:00", 240), ("1-00", 1440),
                                            ("2-12:30", 3630), ("0-00:00:01", 1), ("4h", None), ("1:2:3:4", None)])
def test_sbatch_time_formats(value, minutes):
    assert time_minutes(value) == minutes


def test_bad_slurm_values_are_listed_together(compose_train):
    cfg = compose_train(*CPU_SLURM, "cluster.nodes=0", "cluster.time=4h", "cluster.num_workers=9",
                        "cluster.sbatch_extra=[exclusive]", "cluster.dry_run=true")
    with pytest.raises(ConfigError) as err:
        validate_train(cfg)
    text = str(err.value)
    for expected in ("cluster.nodes=0", "cluster.time='4h'", "do not fit", "['exclusive'] are not sbatch options"):
        assert expected in text


def test_values_that_could_break_out_of_an_sbatch_line_are_refused(compose_train):
    cfg = compose_train(*CPU_SLURM, "cluster.partition='gpu\nrm -rf ~'", "cluster.account='ml;id'",
                        "cluster.qos='a b'", "cluster.constraint='a100&(ib|eth)'", "cluster.mem=400G",
                        "cluster.sbatch_extra=['--exclusive','--comment=x\ntouch /tmp/pwned','--gres=gpu:8']",
                        "cluster.dry_run=true")
    with pytest.raises(ConfigError) as err:
        validate_train(cfg)
    text = str(err.value)
    for expected in ("cluster.partition='gpu\\nrm -rf ~'", "cluster.account='ml;id'", "cluster.qos='a b'",
                     "'--comment=x\\ntouch /tmp/pwned' is not one sbatch option"):
        assert expected in text, expected
    for fine in ("cluster.constraint", "cluster.mem", "'--exclusive'", "'--gres=gpu:8'"):  # real sbatch syntax passes
        assert fine not in text, fine


def test_rendered_script_for_4_nodes_of_8_gpus(compose_train, tmp_path):
    spec = validate_train(compose_train("cluster=slurm", "cluster.nodes=4", "cluster.gpus_per_node=8",
                                        "cluster.partition=gpu", "cluster.account=ml", "cluster.time=12:00:00",
                                        "cluster.mem=800G", "cluster.dry_run=true",
                                        "cluster.sbatch_extra=[--exclusive]", "cluster.setup=[module load cuda]"))
    assert spec.cluster.num_workers == 32  # nodes × gpus_per_node, from conf/cluster/slurm.yaml
    assert spec.global_batch_size == 8 * 32 and spec.grad_accum == 1  # the default batch fits any world size
    script = render(spec, ["cluster=slurm", "cluster.nodes=4", "cluster.dry_run=true", "out_dir=elsewhere"])
    lines = script.splitlines()
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=96",
                     "#SBATCH --gpus-per-node=8", "#SBATCH --mem=800G", "#SBATCH --partition=gpu",
                     "#SBATCH --account=ml", "#SBATCH --time=12:00:00", "#SBATCH --signal=B:USR1@300",
                     "#SBATCH --requeue", "#SBATCH --exclusive", "module load cuda",
                     f"#SBATCH --output={spec.out_dir}/slurm/slurm-%j.out"):
        assert expected in lines, expected
    train_line = next(line for line in lines if "-m ragft train" in line)
    assert f"out_dir={spec.out_dir}" in train_line and "out_dir=elsewhere" not in train_line
    assert "cluster.dry_run" not in train_line  # the job inside the allocation must run, not print
    assert "srun --nodes=$((NODES - 1))" in script
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, cache_dir):
    done = subprocess.run([sys.executable, "-m", "ragft", "train", *CPU_SLURM, "cluster.dry_run=true",
                           f"out_dir={tmp_path / 'run'}", f"registry.path={tmp_path / 'registry.jsonl'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash") and "#SBATCH --cpus-per-task=4" in done.stdout
    assert not (tmp_path / "run" / "slurm").exists()


@pytest.fixture(scope="module")
def slurm_env():
    yield from start_local_slurm()


@pytest.mark.ray
@pytest.mark.deepspeed
def test_preempted_job_requeues_and_resumes(slurm_env, tmp_path, cache_dir):
    """Submit through the rendered script, send the time-limit warning once a checkpoint exists: the job
    checkpoints, requeues itself, resumes from that checkpoint and ends at max_steps with a loadable adapter."""
    out = tmp_path / "run"
    env = {**slurm_env, "RAGFT_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    submit = subprocess.run(
        [sys.executable, "-m", "ragft", "train", *CPU_SLURM, "cluster.time=10", "cluster.signal_lead_s=60",
         f"cluster.ray_port={free_port()}", "train.max_steps=48", "train.save_every=4", "train.eval_every=8",
         "train.log_every=4", "data.max_seq_len=128", "tracking=wandb", "tracking.mode=offline", f"out_dir={out}",
         f"registry.path={tmp_path / 'registry.jsonl'}"],
        capture_output=True, text=True, env={**env, "WANDB_MODE": "offline"}, timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = (out / "slurm" / "job_id").read_text().strip()
    assert f"submitted Slurm job {job_id}" in submit.stdout
    log = out / "slurm" / f"slurm-{job_id}.out"
    try:
        wait_until(lambda: (out / "checkpoints" / "4").is_dir(), 300, "the first checkpoint")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
        wait_until(lambda: "run 2 " in log.read_text(), 240, "the requeued run")
        wait_until(lambda: job_state(job_id, env) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
                   "the end of the job", poll_s=2)
    finally:
        subprocess.run(["scancel", job_id], env=env)
    text = log.read_text()
    assert job_state(job_id, env) == "COMPLETED", text[-3000:]
    assert "USR1" in text and "requeueing job" in text and "resume with: ragft train resume=" in text
    resumed = json.loads((out / "result.json").read_text())
    assert resumed["steps"] == 48 and resumed["metrics"]["step"] == 48
    assert "resumed from" in text
    stopped_at = int(text.split("stopped at step ")[1].split()[0])
    assert 4 <= stopped_at < 48  # the signal reaches the workers a few steps after it is sent
    steps = [m["step"] for m in read_rows(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 48  # the resumed run continued, it did not restart
    # the requeued run is the same run: same id, same W&B run continued (one offline folder per attempt)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(resumed["run_id"]) for r in runs)
    assert resumed["wandb"]["id"] == resumed["run_id"]
    _, first_attempt = read_offline_run(runs[0])
    _, second_attempt = read_offline_run(runs[1])
    assert max(s for s, v in first_attempt.items() if "loss" in v) <= stopped_at
    assert max(s for s, v in second_attempt.items() if "loss" in v) == 48
    final = Path(resumed["final_checkpoint"])
    assert final.name == "48" and json.loads((final / "manifest.json").read_text())["step"] == 48

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, final)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


@pytest.mark.ray
@pytest.mark.deepspeed
def test_submitit_sweep_runs_each_trial_as_a_slurm_job(slurm_env, tmp_path, cache_dir):
    """`ragft train -m hydra/launcher=submitit_slurm`: 2 trials, each a Slurm job with its sbatch options
    from the cluster group, one W&B group, ranked in sweep.json / sweep.md, best checkpoints registered.
    (A 2×2 grid, ASHA and what-differs columns: tests/sweep/test_tune_launcher.py; 4 trials here took 123 s, 2 take 48 s.)"""
    from helpers.wandb_offline import records
    from ragft import registry

    sweep = tmp_path / "sweep"
    env = {**slurm_env, "RAGFT_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(
        [sys.executable, "-m", "ragft", "train", "-m", "hydra/launcher=submitit_slurm", *CPU_SLURM,
         "cluster.num_workers=1", "cluster.cpus_per_task=2", "cluster.time=10", "train.max_steps=6",
         "train.eval_every=3", "train.save_every=6", "train.log_every=3", "train.global_batch_size=8",
         "data.max_seq_len=128", "tracking=wandb", "tracking.mode=offline", "train.lr=3e-3,1e-5",
         f"hydra.sweep.dir={sweep}", f"registry.path={tmp_path / 'registry.jsonl'}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((sweep / "sweep.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 2 and all(t["status"] == "completed" and t["step"] == 6 for t in trials)
    values = [t["value"] for t in trials]
    assert values == sorted(values) and [t["rank"] for t in trials] == [1, 2]
    assert "train.lr=0.003" in trials[0]["overrides"]  # 300× the lr learns more in 6 steps
    assert summary["name"] == "sweep" and summary["best"]["num"] == trials[0]["num"]
    table = (sweep / "sweep.md").read_text()
    assert all(f"| {t['rank']} | {t['num']} |" in table for t in trials)
    # each trial was a Slurm job: submitit's folder holds one log per array task
    assert len(list((sweep / ".submitit").glob("*_[0-1]/*_log.out"))) == 2
    for t in trials:
        run_file = next(Path(t["out_dir"]).glob("wandb/offline-run-*/*.wandb"))
        run = next(r.run for r in records(run_file) if r.WhichOneof("record_type") == "run")
        assert run.run_group == "sweep"
    registered = {e.checkpoint: e for e in registry.entries(tmp_path / "registry.jsonl")}
    for t in trials:
        assert registered[t["best_checkpoint"]].metrics["sweep.eval_loss"] == pytest.approx(t["value"])
