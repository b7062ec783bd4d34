"""Generation with a KV cache (llm/generate.py) and loading a model out of any checkpoint (llm/store/weights.py)."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import flip_bytes
from launch import ROOT, environment

from llm.config.schema import ModelConfig
from llm.data.dataset import open_windows
from llm.model.generation import GenerationError, Sampling, generate
from llm.model.gpt import GPT
from llm.parallel.mesh import Mesh
from llm.store.checkpoint import CheckpointError
from llm.store.weights import load_model
from llm.train import train
from llm.training.tasks import evaluate

GPT2_STYLE = ModelConfig(vocab_size=101, n_layer=2, n_head=4, n_embd=32, max_seq_len=64)
LLAMA_STYLE = replace(
    GPT2_STYLE, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False
)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [42], [3, 1, 4, 1, 5]]  # different lengths: left padding in a batch


def model_of(cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg).double().eval()  # float64: greedy choices cannot flip on rounding between the two paths


def greedy_by_full_forward(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The plain model (the training path: no cache, no padding) extended one argmax at a time."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("cfg", [GPT2_STYLE, LLAMA_STYLE], ids=["gpt2", "llama-gqa"])
def test_cached_greedy_generation_equals_recomputing_for_a_batch_of_different_lengths(cfg):
    model, s = model_of(cfg), Sampling(max_new_tokens=20, temperature=0)
    cached = generate(model, PROMPTS, s, use_cache=True)
    assert cached == generate(model, PROMPTS, s, use_cache=False)
    assert cached == [greedy_by_full_forward(model, p, 20) for p in PROMPTS]  # alone = in a batch
    assert len({tuple(x) for x in cached}) == 3


def test_sampling_is_deterministic_per_seed_and_its_filters_work():
    model = model_of(GPT2_STYLE)
    s = Sampling(max_new_tokens=15, temperature=1.0, seed=7)
    a = generate(model, PROMPTS, s)
    assert a == generate(model, PROMPTS, s) == generate(model, PROMPTS, s, use_cache=False)
    assert a != generate(model, PROMPTS, replace(s, seed=8))
    greedy = generate(model, PROMPTS, replace(s, temperature=0))
    assert generate(model, PROMPTS, replace(s, top_k=1)) == greedy  # one candidate left: the argmax
    assert generate(model, PROMPTS, replace(s, top_p=1e-9)) == greedy  # the smallest set reaching p: the argmax
    assert generate(model, PROMPTS, replace(s, top_k=5)) != greedy


def test_generation_stops_at_eos_row_by_row():
    model, s = model_of(GPT2_STYLE), Sampling(max_new_tokens=20, temperature=0)
    free = generate(model, PROMPTS, s)
    eos = free[0][4]  # make the fifth token of the first row the end of text
    stopped = generate(model, PROMPTS, s, eos_id=eos)
    for row, full in zip(stopped, free, strict=True):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    assert generate(model, PROMPTS, replace(s, stop_at_eos=False), eos_id=eos)[1] == free[1]


def test_bad_settings_are_refused_in_one_line():
    model = model_of(GPT2_STYLE)
    too_long = "a prompt of 7 tokens plus 60 new tokens exceeds the model's context of 64"
    with pytest.raises(GenerationError, match=too_long):
        generate(model, PROMPTS, Sampling(max_new_tokens=60))
    for bad, message in [
        (Sampling(temperature=-1), "temperature"),
        (Sampling(top_p=0), "top-p"),
        (Sampling(top_k=0), "top-k"),
        (Sampling(max_new_tokens=0), "max new tokens"),
    ]:
        with pytest.raises(GenerationError, match=message):
            generate(model, PROMPTS, bad)
    with pytest.raises(GenerationError, match="every prompt needs at least one token"):
        generate(model, [[1], []], Sampling())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_checkpoint_of_any_zero_stage_loads_into_a_plain_model_with_the_trained_weights(cfg_factory, stage):
    # n_embd 160: ZeRO-3 partitions the large matrices, so its checkpoint must be consolidated
    cfg = cfg_factory(f"z{stage}", deepspeed={"stage": stage}, model={"n_embd": 160}, train={"max_steps": 2})
    cfg.train = replace(cfg.train, eval_every=2, ckpt_every_steps=2)
    out = train(cfg)
    run_cfg, model, tok = load_model(out["run_dir"])
    assert run_cfg.model == cfg.model and not model.training
    # the run's own val loss after step 2, recomputed by the loaded model over the same windows
    windows = open_windows(cfg.data.paths, "val", cfg.data.seq_len, cfg.train.seed, cfg.data.weights, shuffle=False)
    loss = evaluate(model, windows, run_cfg, Mesh(1, 0), torch.device("cpu"), tok.eos_id)
    assert loss == pytest.approx(out["val_loss"], abs=1e-6)


def test_the_command_line_generates_from_a_run_and_refuses_what_is_not_a_checkpoint(cfg_factory, tmp_path):
    out = train(cfg_factory("cli", train={"max_steps": 2, "ckpt_every_steps": 2, "eval_every": 0}))
    cmd = [sys.executable, "-m", "llm.generate", "--checkpoint", out["run_dir"], "--prompt", "def ", "--prompt", "x"]
    r = subprocess.run(
        [*cmd, "--max-new-tokens", "8", "--seed", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("def ") and r.stdout.count("-" * 40) == 2
    r = subprocess.run(
        [*cmd, "--max-new-tokens", "1000"], capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=300
    )
    assert r.returncode == 2 and r.stderr.startswith("error: a prompt of ") and r.stderr.count("\n") == 1
    cmd[4] = str(tmp_path)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=300)
    assert r.returncode == 2 and "holds no checkpoint" in r.stderr and r.stderr.count("\n") == 1
    bad_device = "nonsense" if torch.cuda.is_available() else "cuda:0"
    r = subprocess.run([*cmd, "--device", bad_device], capture_output=True, text=True, cwd=ROOT, env=environment())
    assert r.returncode == 2 and "--device" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path)
    step = Path(out["run_dir"]) / "checkpoints" / "step_00000002"
    flip_bytes(step / "mp_rank_00_model_states.pt")  # same size, different bytes
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_model(out["run_dir"])
