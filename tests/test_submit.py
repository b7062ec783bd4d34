"""`python -m llm.submit`: what a job will run, shown before it queues; bad input rejected before sbatch."""

import json
import subprocess
import sys

from launch import ROOT, environment


def submit(*args):
    cmd = [sys.executable, "-m", "llm.submit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=120)


def test_a_dry_run_shows_the_config_the_deepspeed_json_and_the_sbatch_line(tmp_path):
    r = submit("--dry-run", "--nodes=2", "--qos=high", "experiment=gpt2-124m", "deepspeed=zero3", "name=my-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "# resolved config (16 ranks: 2 node(s) x 8 GPU(s))" in out and "name: my-run" in out
    ds = json.loads(out.split("# DeepSpeed JSON (written to the run directory when the job starts)\n")[1].split("#")[0])
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 512
    assert ds["gradient_accumulation_steps"] * ds["train_micro_batch_size_per_gpu"] * 16 == 512
    line = out.split("# sbatch command\n")[1].strip()
    assert line.startswith("sbatch --parsable --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --output=")
    script = ROOT / "slurm" / "pretrain.sbatch"
    assert line.endswith(f"--qos=high {script} experiment=gpt2-124m deepspeed=zero3 name=my-run")


def test_a_fine_tuning_run_goes_to_the_fine_tuning_job_script():
    ft = ("task=sft", "finetune.init_from=runs/demo", "finetune.train_file=t.jsonl")
    r = submit("--dry-run", "--nodes=1", "--gpus-per-node=2", *ft)
    assert r.returncode == 0, r.stderr
    line = r.stdout.split("# sbatch command\n")[1].strip()
    assert line.endswith(f"{ROOT / 'slurm' / 'finetune.sbatch'} {' '.join(ft)}")
    r = submit(
        "--dry-run", "--gpus-per-node=2", "task=sft"
    )  # a fine-tuning run without its starting point: refused before sbatch
    assert r.returncode == 2 and r.stderr.startswith("error: finetune.init_from:") and r.stderr.count("\n") == 1


def test_bad_input_is_rejected_before_anything_is_queued():
    r = submit("--dry-run", "model.n_layr=3")
    assert r.returncode == 2 and r.stderr.startswith("error: bad override: ")
    assert "did you mean model.n_layer?" in r.stderr
    # valid alone, invalid at the job's world size: 512 sequences do not split over 3 x 7 ranks of 16
    r = submit("--dry-run", "--nodes=3", "--gpus-per-node=7", "experiment=gpt2-124m")
    assert r.returncode == 2
    assert "train.global_batch: 512 is not divisible by train.micro_batch=16 x world size 21" in r.stderr


def test_the_job_check_validates_at_the_jobs_size_and_leaves_a_token_in_the_run_directory(tmp_path):
    env = {**environment(), "SLURM_NTASKS": "21", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "3"}
    cmd = [sys.executable, "-m", "llm.submit", "--job-check", "experiment=gpt2-124m", f"runs_dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: train.global_batch: 512 is not divisible by train.micro_batch=16 x world size 21"
    )
    assert not any(tmp_path.iterdir())  # nothing written
    env["SLURM_NTASKS"] = "16"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    token = tmp_path / "gpt2-124m" / "rendezvous" / "shared.77.3"
    assert r.returncode == 0 and r.stdout.strip() == str(token) and token.is_file(), r.stderr


def test_the_long_context_recipe_is_checked_at_its_world_size():
    r = submit("--dry-run", "--nodes=4", "experiment=llama-1b-32k")
    assert r.returncode == 0, r.stderr
    assert "sequence: 8" in r.stdout and "seq_len: 32768" in r.stdout and "rope_theta: 1000000.0" in r.stdout
    ds = json.loads(
        r.stdout.split("# DeepSpeed JSON (written to the run directory when the job starts)\n")[1].split("#")[0]
    )
    # 32 ranks, 4 data-parallel groups of 8: 32 sequences per step are 8 micro-batches per group; DeepSpeed, which
    # counts every rank as data parallel, sees 8 micro-batches of 1 on 32 ranks
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_batch_size"] == 256
    r = submit("--dry-run", "--nodes=1", "--gpus-per-node=4", "experiment=llama-1b-32k")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: parallel.sequence: 8 does not divide the world size 4; use a divisor of it"
    )
