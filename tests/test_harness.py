"""Our model class for the lm-evaluation-harness (llm/evals/harness.py): the same log-likelihoods as the harness's
own `hf` model on our HuggingFace export (both architectures), whatever the batch size; greedy generation cut
at stop strings equals generating without the cache."""

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from llm.config.schema import ModelConfig  # noqa: E402
from llm.data.tokenizer import Tokenizer  # noqa: E402
from llm.evals.harness import HarnessModel  # noqa: E402
from llm.model.gpt import GPT  # noqa: E402

PARITY_ATOL = 1e-4  # the bound asked for; measured: 0.0 on CPU, both architectures, both kinds (2026-12-05)
ARCHS = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, max_seq_len=48),
    "llama": dict(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=48, norm="rmsnorm", pos="rope", mlp="swiglu",
        bias=False, tie_embeddings=False, mlp_multiple_of=16,
    ),
}  # fmt: skip
TEXTS = [
    ("def parse(self, text):", " return self.decode(text)"),
    ("import os\n", "import sys"),
    ("", "class Parser:"),
    ("x = [1, 2, 3]\nfor i in x:\n    print(", "i)"),
    ("a " * 30, "b c d e f g h i j k l m n o p"),  # longer than the context: cut on the left
]


def requests(kind: str):
    if kind == "loglikelihood":
        return [Instance(kind, {}, pair, i) for i, pair in enumerate(TEXTS)]
    return [Instance(kind, {}, (c + x,), i) for i, (c, x) in enumerate(TEXTS)]


@pytest.fixture(scope="module", params=list(ARCHS))
def models(request, tokenizer_dir, tmp_path_factory):
    """(ours, the harness's hf model on our export) of one random-weight model."""
    from lm_eval.models.huggingface import HFLM

    from llm.model.hf import write_hf

    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **ARCHS[request.param])
    model = GPT(cfg).eval()
    out = tmp_path_factory.mktemp("hf") / request.param
    write_hf(cfg, {k: v.clone() for k, v in model.state_dict().items()}, tok, out)
    hf = HFLM(pretrained=str(out), batch_size=4, device="cpu", prefix_token_id=tok.eos_id)
    return HarnessModel(model=model, tokenizer=tok, batch_size=4), hf


@pytest.mark.parametrize("kind", ["loglikelihood", "loglikelihood_rolling"])
def test_log_likelihoods_equal_the_hf_backends_on_our_export(models, kind):
    ours, hf = models
    got, want = getattr(ours, kind)(requests(kind)), getattr(hf, kind)(requests(kind))
    assert len(got) == len(want) == len(TEXTS)
    for a, b in zip(got, want, strict=True):
        a, b = (a, b) if kind == "loglikelihood_rolling" else (a[0], b[0])
        assert b < -1.0  # a real score, not an empty one
        assert abs(a - b) <= PARITY_ATOL, (a, b)
    if kind == "loglikelihood":
        assert [g for _, g in got] == [g for _, g in want]


def test_batch_size_does_not_change_a_score(models):
    ours, _ = models
    one = HarnessModel(model=ours.model, tokenizer=ours.tok, batch_size=1)
    a, b = ours.loglikelihood(requests("loglikelihood")), one.loglikelihood(requests("loglikelihood"))
    assert all(abs(x[0] - y[0]) <= 1e-5 and x[1] == y[1] for x, y in zip(a, b, strict=True))


def test_generation_stops_at_the_first_stop_string_and_equals_recomputation(models):
    from llm.model.generation import Sampling, generate

    ours, _ = models
    prompt = "def parse(self, text):"
    full = ours.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 20}), 0)])[0]
    ids = ours.tok_encode(prompt)
    plain = generate(ours.model, [ids], Sampling(max_new_tokens=20, temperature=0), ours.eot_token_id, use_cache=False)
    tokens = plain[0][:-1] if plain[0][-1] == ours.eot_token_id else plain[0]
    assert full == ours.tok_decode(tokens) and len(full) > 0
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = ours.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 20}), 0)])
    assert cut[0] == full[: full.find(stop)]


def test_generation_in_batches_equals_one_request_at_a_time(models):
    ours, _ = models
    one = HarnessModel(model=ours.model, tokenizer=ours.tok, batch_size=1)
    settings = [{"until": ["\n"], "max_gen_toks": 12}, {"until": [")", "\n"], "max_gen_toks": 12}, {"max_gen_toks": 6}]
    reqs = [
        Instance("generate_until", {}, (c + x[: len(x) // 2], settings[i % 3]), i) for i, (c, x) in enumerate(TEXTS)
    ] * 2  # prompts of different lengths, in groups of the same settings
    got = ours.generate_until(reqs)
    assert got == one.generate_until(reqs) and any(got)


# ---- the commands ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_dir, tokenizer_dir):
    from helpers import make_cfg

    from llm.train import train

    cfg = make_cfg(tmp_path_factory.mktemp("harness"), prepared_dir, tokenizer_dir, "h", train={"max_steps": 2})
    return train(cfg)["run_dir"]


def test_evaluate_scores_the_shipped_tasks_offline_the_same_on_two_ranks(run_dir, tmp_path):
    import json
    import subprocess
    import sys

    from launch import ROOT, environment, free_port, run_module

    tasks = "stdlib_next_line,stdlib_docstring,stdlib_completion,stdlib_rolling"
    args = ["--checkpoint", str(run_dir), "--tasks", tasks, "--limit", "7"]  # 7: unequal shares of 2 ranks
    r = run_module("llm.evaluate", *args, "--output", tmp_path / "one.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stdlib_next_line: acc " in r.stdout
    results = json.loads((tmp_path / "one.json").read_text())["results"]
    assert set(results) == set(tasks.split(","))
    assert 0 <= results["stdlib_next_line"]["acc,none"] <= 1 and results["stdlib_next_line"]["sample_len"] == 7
    assert results["stdlib_rolling"]["bits_per_byte,none"] > 0 and "exact_match,none" in results["stdlib_completion"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd = [*torchrun, "-m", "llm.evaluate", *args, "--output", str(tmp_path / "two.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text())["results"] == results  # bitwise


def test_the_harness_command_line_runs_our_model_by_name(run_dir, tmp_path):
    from launch import run_module

    r = run_module(
        "llm.harness", "--model", "llm-pretrain", "--model_args", f"checkpoint={run_dir}", "--tasks",
        "stdlib_next_line", "--limit", 4, "--output_path", tmp_path / "out",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stdlib_next_line" in r.stdout and list((tmp_path / "out").rglob("results_*.json"))


HUB_TASK = (
    "task: hub_task\ndataset_path: Rowan/hellaswag\noutput_type: multiple_choice\ntest_split: test\n"
    "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\ndoc_to_target: label\n"
)
NOT_HERE = "reads its data from 'Rowan/hellaswag', which is not on this machine, and nothing is downloaded here"


@pytest.mark.parametrize(
    "name, yaml, message",
    [
        ("hub_task", HUB_TASK, f"error: task hub_task {NOT_HERE}"),
        (
            "no_such_task",
            None,
            "error: unknown task 'no_such_task'; shipped: stdlib_completion, stdlib_docstring, stdlib_next_line, "
            "stdlib_rolling; others come from a directory of task YAMLs",
        ),
        (
            "mixed",
            "group: mixed\ntask:\n  - stdlib_next_line\n  - hub_task\n---\n" + HUB_TASK,
            f"error: task hub_task (in mixed) {NOT_HERE}",
        ),
        (
            "outer",
            "group: outer\ntask:\n  - inner\n---\ngroup: inner\ntask:\n  - stdlib_rolling\n  - task: hub_inline\n"
            "    dataset_path: Rowan/hellaswag\n    output_type: multiple_choice\n",
            f"error: task hub_inline (in outer > inner) {NOT_HERE}",
        ),
    ],
    ids=["hub", "unknown", "group-with-a-hub-task", "nested-group-with-an-inline-hub-task"],
)
def test_a_task_that_cannot_run_offline_is_refused_in_one_line_before_the_model_loads(tmp_path, name, yaml, message):
    from launch import run_module

    (tmp_path / "tasks").mkdir()
    for i, doc in enumerate((yaml or "").split("---\n")):
        if doc:
            (tmp_path / "tasks" / f"t{i}.yaml").write_text(doc)
    missing = tmp_path / "no-checkpoint-here"  # never read: the tasks are checked first
    r = run_module("llm.evaluate", "--checkpoint", missing, "--tasks", name, "--include-path", tmp_path / "tasks")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-2000:]


def test_bench_harness_smoke(run_dir, tmp_path):
    import json
    import subprocess
    import sys

    from launch import ROOT, environment

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "tools/bench_harness.py", "--checkpoint", run_dir, "--limit", "4", "--out", out]
    r = subprocess.run(
        [*map(str, cmd), "--tasks", "stdlib_next_line"], capture_output=True, text=True, cwd=ROOT, env=environment()
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 16 and result["ours_over_hf"] > 0  # 4 questions x 4 choices, scored alike by both
    assert set(result["scores"]) == {"checkpoint", "random_init"}


def test_bench_harness_in_loop_smoke(tmp_path, prepared_dir, tokenizer_dir):
    import json
    import subprocess
    import sys

    from launch import ROOT, environment

    out = tmp_path / "bench_harness_cpu.json"
    settings = [
        f"data.paths=[{prepared_dir}]", f"data.tokenizer={tokenizer_dir}", "data.prepare_if_missing=false",
        "data.seq_len=32", "model.n_layer=2", "model.n_embd=32", "model.max_seq_len=64", "train.micro_batch=4",
        "train.global_batch=8", "train.max_steps=4", "train.eval_every=2", "train.sample_tokens=0",
    ]  # fmt: skip
    cmd = [sys.executable, "tools/bench_harness.py", "--in-loop", "--limit", "2", "--out", str(out), *settings]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment())
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "bench_harness_in_loop_cpu.json").read_text())
    assert result["evaluations"] == 2 and 0 < result["tasks_s"] < result["wall_s"] and 0 < result["share"] < 1
    assert result["last_scores"]["eval/stdlib_next_line/acc"] in (0.0, 0.5, 1.0)


def test_the_shipped_tasks_are_what_the_tool_makes_with_its_fixed_seed(tmp_path):
    import subprocess
    import sys

    from launch import ROOT, environment

    from llm.evals.suite import SHIPPED

    cmd = [sys.executable, "tools/make_eval_tasks.py", "--output", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment())
    assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert made == sorted(p.name for p in SHIPPED.glob("*.jsonl")) and len(made) == 4
    for name in made:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name
