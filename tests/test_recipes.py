"""The documented recipes run as written: each bash block is taken from its page in docs/ itself, with the paths
moved into a temporary directory and the step counts cut down."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LICENSES = Path("/usr/share/common-licenses")


def doc_block(heading: str) -> str:
    """The first ```bash block after `heading` in the page of docs/ that has it, its line continuations joined."""
    text = next(t for p in sorted((ROOT / "docs").glob("*.md")) if heading in (t := p.read_text()))
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading) :], re.S).group(1)
    return block.replace("\\\n", " ")


@pytest.mark.slow
@pytest.mark.skipif(not LICENSES.is_dir(), reason="needs /usr/share/common-licenses (Debian, Ubuntu)")
def test_the_character_level_recipe(tmp_path):
    script = doc_block("## Recipe: a character-level model on a text file")
    script = script.replace(".venv/bin/python", sys.executable).replace("tools/", f"{ROOT}/tools/")
    script = script.replace("train.max_steps=2000 train.eval_every=500", "train.max_steps=4 train.eval_every=2")
    script += " logger=none\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ["bash", "-euo", "pipefail", "-c", script]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "char vocab 90" in r.stdout and "0 unknown-character tokens" in r.stderr
    metrics = (tmp_path / "runs" / "chars" / "metrics.jsonl").read_text()
    assert '"step": 4, "val/loss"' in metrics


@pytest.mark.slow
def test_the_fine_tuning_recipe(tmp_path):
    # every command of the page's recipe, in order, with a few steps each instead of the measured runs
    lines = []
    for line in doc_block("## Recipe: the standard library as fine-tuning data").splitlines():
        line = re.sub(r"\s+#.*$", "", line).replace(".venv/bin/python", sys.executable)
        line = line.replace("tools/", f"{ROOT}/tools/")
        if "-m llm.train" in line or "-m llm.finetune" in line:
            line += " train.max_steps=4 train.eval_every=2 logger=none"
        lines.append(line)
    assert sum("-m llm.finetune" in line for line in lines) == 3 and "-m llm.evaluate" in lines[-1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    runs = tmp_path / "runs"
    assert '"step": 4, "val/loss"' in (runs / "sft-demo" / "metrics.jsonl").read_text()
    for name in ("cls-demo", "cls-random"):
        assert '"val/accuracy"' in (runs / name / "metrics.jsonl").read_text()
    assert re.search(r"sft_val.jsonl: response loss \d+\.\d+, ppl \d+\.\d+ \(489 examples", r.stdout), r.stdout[-1000:]
