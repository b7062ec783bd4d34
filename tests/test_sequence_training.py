"""`python -m llm.train parallel.sequence=N` under torchrun (gloo): every sequence split over N ranks trains as one
rank holding whole sequences does, within fp32 round-off, for both architectures, with data parallelism beside it,
under ZeRO-3, and across resumes that change the sequence-parallel size. The model-level checks (documents across
the parts, GQA with fewer KV heads than ranks): tests/test_sequence_parallel.py.

Not bitwise: the loss is summed part by part and each gradient is a sum of the parts' contributions, so the
order of the floating-point additions differs from one rank's."""

import time

import pytest
import torch
from launch import launch, losses, outcome, overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LLAMA = (
    "model.norm=rmsnorm", "model.pos=rope", "model.mlp=swiglu", "model.bias=false", "model.tie_embeddings=false",
    "model.mlp_multiple_of=16", "model.n_kv_head=1",
)  # fmt: skip
LOSS_RTOL = 1e-6  # measured: <= 7.5e-8 relative, train and val, over 6 steps (2026-12-05)
BF16_RTOL = 1e-4  # bf16 autocast: measured <= 7.6e-6 relative over 6 steps of SFT (2026-12-05)
WEIGHT_ATOL = 2e-6  # measured: <= 2.1e-7 after 6 steps (2026-12-05)


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared_dir, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("sp")

    def start(name, *extra, nproc=1, check=True):
        return launch(overrides(tmp, prepared_dir, tokenizer_dir, name, *extra), nproc=nproc, check=check)

    start.tmp = tmp
    return start


def final_weights(tmp, name) -> dict[str, torch.Tensor]:
    from llm.store.weights import load_weights

    return load_weights(tmp / "runs" / name / "checkpoints" / "step_00000006")[1]


def assert_trains_alike(tmp, reference, other) -> None:
    want, got = losses(tmp, reference), losses(tmp, other)
    assert set(got) == set(want) == set(range(1, 7))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= LOSS_RTOL * loss, (step, got[step], loss)
    val = losses(tmp, reference, "val/loss")
    for step, loss in losses(tmp, other, "val/loss").items():
        assert abs(val[step] - loss) <= LOSS_RTOL * loss, (step, val[step], loss)
    a, b = final_weights(tmp, reference), final_weights(tmp, other)
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= WEIGHT_ATOL, worst


@pytest.fixture(scope="module")
def gpt2_whole(run):
    run("gpt2-whole", "train.ckpt_every_steps=2")
    return "gpt2-whole"


def test_gpt2_on_2_data_parallel_groups_of_2_under_zero2_trains_as_one_rank(run, gpt2_whole):
    # (sp 4 alone: the Llama test and the resume below start there; sp 2 alone: tests/test_sequence_parallel.py)
    r = run("gpt2-dp2-sp2", "parallel.sequence=2", "deepspeed=zero2", "train.ckpt_every_steps=2", nproc=4)
    assert "4 rank(s) (sequence parallel 2)" in r.stderr + r.stdout
    assert_trains_alike(run.tmp, gpt2_whole, "gpt2-dp2-sp2")


def test_llama_with_one_kv_head_under_zero3_and_activation_checkpointing_at_sequence_parallel_4_trains_as_one_rank(
    run,
):
    common = (*LLAMA, "deepspeed=zero3", "train.activation_checkpointing=true")  # recomputation repeats the exchanges
    run("llama-whole", *common)
    run("llama-sp4", *common, "parallel.sequence=4", nproc=4)
    assert_trains_alike(run.tmp, "llama-whole", "llama-sp4")


def test_a_run_resumed_from_sequence_parallel_4_to_2_to_1_continues_as_the_uninterrupted_run(run, gpt2_whole):
    for nproc in (4, 2, 1):
        t0 = time.time()
        run("chain", f"parallel.sequence={nproc}", "train.ckpt_every_steps=2", "train.steps_per_run=2", nproc=nproc)
        o = outcome(run.tmp, "chain", since=t0)
        assert o.returncode == 0, o.stdout
    assert o.stdout.startswith("finished: reached step 6")
    assert_trains_alike(run.tmp, gpt2_whole, "chain")


def test_sft_with_lora_in_bf16_at_sequence_parallel_2_trains_as_one_rank(run, gpt2_whole):
    """Responses (the only targets) cross the parts' boundaries unevenly: the loss is per target of the group."""
    from helpers import sft_rows, write_jsonl

    data = write_jsonl(run.tmp / "sft.jsonl", sft_rows(40))
    common = (
        "task=sft", f"finetune.init_from={run.tmp / 'runs' / gpt2_whole}", f"finetune.train_file={data}",
        f"finetune.val_file={data}", "lora.rank=4", "lora.targets=[qkv,proj,up]", "deepspeed.precision=bf16",
    )  # fmt: skip
    run("sft-whole", *common)
    run("sft-sp2", *common, "parallel.sequence=2", nproc=2)
    want, got = losses(run.tmp, "sft-whole"), losses(run.tmp, "sft-sp2")
    assert set(got) == set(want) == set(range(1, 7))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= BF16_RTOL * loss, (step, got[step], loss)
    val = losses(run.tmp, "sft-whole", "val/loss")
    assert val.keys() == losses(run.tmp, "sft-sp2", "val/loss").keys() == {3, 6}
    for step, loss in losses(run.tmp, "sft-sp2", "val/loss").items():
        assert abs(val[step] - loss) <= BF16_RTOL * loss, (step, val[step], loss)


@pytest.mark.parametrize(
    "extra, nproc, message",
    [
        (("parallel.sequence=2",), 1, "parallel.sequence: 2 does not divide the world size 1; use a divisor of it"),
        (("parallel.sequence=2", "model.n_head=1"), 1, "parallel.sequence: 2 does not divide model.n_head=1"),
        (
            ("parallel.sequence=2", "model.n_head=6", "model.n_embd=48", "model.n_kv_head=3"),
            1,
            "parallel.sequence: 2 and model.n_kv_head=3: one must divide the other",
        ),
        (("parallel.sequence=2", "data.seq_len=31"), 1, "parallel.sequence: 2 does not divide data.seq_len=31"),
        (
            ("parallel.sequence=2", "task=classify", "finetune.init_from=x", "finetune.train_file=y"),
            1,
            "task=classify reads whole sequences",
        ),
    ],
    ids=["world", "heads", "kv-heads", "seq-len", "classify"],
)
def test_sizes_that_cannot_work_are_refused_in_one_line(run, extra, nproc, message):
    r = run("refused", *extra, nproc=nproc, check=False)  # (model shapes are checked before the world size)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
