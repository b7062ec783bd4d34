"""`python -m llm.train` as users start it: plainly or under torchrun, resumed on any number of ranks, and
through bad overrides.

Runs use OMP_NUM_THREADS=1 so that 1-rank and 2-rank runs sum in the same order and compare bitwise.
"""

import json
import time

import pytest
from helpers import HF_LOGITS_ATOL
from launch import launch, losses, outcome, overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture
def args(tmp_path, prepared_dir, tokenizer_dir):
    return lambda name, *extra: overrides(tmp_path, prepared_dir, tokenizer_dir, name, *extra)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_on_another_number_of_ranks_is_bitwise_exact(tmp_path, args, stage):
    # One run in segments on 1, 2 and 1 ranks (resumes 1->2 and 2->1) against the same run in one go on 1 rank:
    # the same loss at every step. 1 rank x 2 micro-batches sums exactly as 2 ranks x 1 micro-batch. Clipping
    # at 0.05 acts at every step (the default 1.0 would hardly act on this model): ZeRO-0 clips in the loop,
    # ZeRO 1-3 inside DeepSpeed over partitions, and the norms agree bitwise across world sizes too.
    # Same-size resumes: test_train.py (1->1), test_faults.py and test_slurm.py (2->2).
    common = (f"deepspeed=zero{stage}", "optim.grad_clip=0.05", "train.ckpt_every_steps=2", "train.eval_every=3")
    launch(args("whole", *common))
    assert min(losses(tmp_path, "whole", "train/grad_norm").values()) > 0.05  # the clip acted at every step
    for nproc in (1, 2, 1):
        t0 = time.time()
        launch(args("chain", *common, "train.steps_per_run=2"), nproc=nproc)
        o = outcome(tmp_path, "chain", since=t0)
        assert o.returncode == 0 and o.stdout.startswith(("paused: stopped after", "finished: reached step 6")), (
            o.stdout
        )
    assert o.stdout.startswith("finished: reached step 6")
    assert losses(tmp_path, "whole") == losses(tmp_path, "chain")
    assert losses(tmp_path, "whole", "val/loss") == losses(tmp_path, "chain", "val/loss")
    universal = tmp_path / "runs" / "chain" / "checkpoints" / "universal"
    assert universal.is_dir() == (stage > 0)  # partitioned optimizer state went through the universal format
    if stage == 3:
        export_matches(tmp_path / "runs" / "chain" / "checkpoints" / "step_00000004", tmp_path / "runs" / "whole")


def export_matches(sharded, reference_run) -> None:
    """The HuggingFace export of a checkpoint that 2 ranks wrote with partitioned weights gives the logits of the
    same step of the 1-rank run, loaded by us (the two runs trained bitwise alike)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from llm.model.hf import write_hf
    from llm.store.weights import load_model, load_weights

    assert len(list(sharded.glob("*optim_states.pt"))) == 2
    cfg, weights, tok, _ = load_weights(sharded)
    write_hf(cfg.model, weights, tok, sharded.parent.parent / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(sharded.parent.parent / "hf").eval()
    _, model, _ = load_model(reference_run / "checkpoints" / sharded.name)
    ids = torch.arange(64).reshape(2, 32) * 7 % cfg.model.vocab_size
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= HF_LOGITS_ATOL


def test_plain_run_writes_the_run_directory_and_a_sample(tmp_path, args):
    r = launch(args("plain", "train.sample_tokens=16", "train.max_steps=2"))
    run = tmp_path / "runs" / "plain"
    assert "sample:\n" in r.stderr and "parameters;" in r.stderr
    assert (run / "config.yaml").is_file() and json.loads((run / "deepspeed.json").read_text())["zero_optimization"]
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.n_layr=3"], "error: bad override: Could not override 'model.n_layr'."),
        (["model.n_embd=30"], "error: model.n_embd: 30 is not divisible by model.n_head=4"),
        (["logger.log_every=0"], "error: logger.log_every: 0 must be at least 1"),
        (["resume=/nonexistent/ckpt"], "error: cannot resume: /nonexistent/ckpt does not exist"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, args, extra, message):
    r = launch(args("bad", *extra), check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_a_data_error_on_rank_zero_stops_every_rank(tmp_path, args):
    r = launch(
        args(
            "nodata",
            "data.paths=[/nonexistent/data]",
            "data.prepare_if_missing=true",
            "data.corpus=[/nonexistent/corpus]",
        ),
        nproc=2,
        check=False,
    )
    assert r.returncode != 0
    assert r.stderr.count("error: input path does not exist: /nonexistent/corpus") == 2  # both ranks, no hang
