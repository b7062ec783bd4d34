"""`python -m llm.evaluate`: loss, perplexity and bits per byte of a checkpoint on a prepared split, the same on
any number of ranks."""

import json
import math
import subprocess
import sys

import pytest
from launch import ROOT, environment, free_port

from llm.data.dataset import TokenStream, open_windows
from llm.evaluate import score
from llm.store.weights import load_model
from llm.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_dir, tokenizer_dir):
    from helpers import make_cfg

    cfg = make_cfg(tmp_path_factory.mktemp("eval"), prepared_dir, tokenizer_dir, "ev", train={"max_steps": 4})
    return train(cfg)


def test_the_loss_is_the_runs_val_loss_and_bytes_are_those_of_the_decoded_text(run_dir, prepared_dir):
    cfg, model, tok = load_model(run_dir["run_dir"])
    windows = open_windows(cfg.data.paths, "val", cfg.data.seq_len, shuffle=False)
    first = cfg.train.eval_batches * cfg.train.global_batch  # the windows the run evaluated on
    assert score(model, windows, tok, batch_size=3, max_windows=first)["loss"] == pytest.approx(
        run_dir["val_loss"], abs=1e-5
    )
    everything = score(model, windows, tok, batch_size=5)
    T = cfg.data.seq_len
    assert everything["windows"] == windows.n and everything["tokens"] == windows.n * T
    stream = TokenStream.open(prepared_dir, "val")
    import numpy as np

    targets = np.empty(windows.n * T, dtype=np.int64)
    stream.read(1, windows.n * T, targets)  # every window's targets, end to end
    assert everything["bytes"] == len(tok.decode(targets.tolist()).encode("utf-8"))
    bpb = everything["loss"] * everything["tokens"] / math.log(2) / everything["bytes"]
    assert everything["bits_per_byte"] == pytest.approx(bpb, rel=1e-12) and 0.5 < bpb < 20


def test_an_exported_model_is_scored_over_its_own_context_by_default(run_dir, prepared_dir, tmp_path):
    # an hf: export carries no data.seq_len: the windows default to the model's context (64 here), not the
    # schema's 256, which the model could not take
    from llm.evaluate import evaluate
    from llm.model.hf import write_hf
    from llm.store.weights import load_weights

    cfg, weights, tok, _ = load_weights(run_dir["run_dir"])
    write_hf(cfg.model, weights, tok, tmp_path / "hf")
    out = evaluate(f"hf:{tmp_path / 'hf'}", [str(prepared_dir)], "val", None, 4, 8, "cpu")
    assert out["seq_len"] == cfg.model.max_seq_len == 64 and out["data"][str(prepared_dir)]["windows"] == 8


def evaluate_cli(run, out, nproc=1, *extra):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = [*launcher, "-m", "llm.evaluate", "--checkpoint", run, "--output", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=300)


@pytest.mark.distributed
def test_two_ranks_give_bitwise_the_numbers_of_one_and_bad_input_is_one_line(run_dir, tmp_path):
    extra = ("--batch-size", "3", "--max-windows", "10")  # 4 batches, the last one partial: uneven across ranks
    one = evaluate_cli(run_dir["run_dir"], tmp_path / "one.json", 1, *extra)
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout.count("loss ") == 1 and "bits/byte" in one.stdout
    two = evaluate_cli(run_dir["run_dir"], tmp_path / "two.json", 2, *extra)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a == b and a["data"] and next(iter(a["data"].values()))["windows"] == 10
    bad = evaluate_cli(run_dir["run_dir"], tmp_path / "x.json", 1, "--data", str(tmp_path))
    assert bad.returncode == 2 and "manifest.json is missing" in bad.stderr and bad.stderr.count("\n") == 1
