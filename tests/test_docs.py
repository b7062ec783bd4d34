"""The docs cannot rot: every command line shown in README.md and docs/ (in a bash block or inline) names a
command, script or tool that exists and whose arguments its parser accepts (Hydra overrides compose into a valid
config; a command named without arguments must exist); the command table and the exit-code table shown there
are the code's own. (The recipes that run end to end are test_recipes.py's.)"""

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

from llm.__main__ import COMMANDS
from llm.config.compose import load_config
from llm.training.outcome import OUTCOMES, table

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = {"PATH": "corpus", "DIR": "dir", "OUT": "out", "N": "2", "FILE": "file"}
LAUNCHED = re.compile(r"(?:-m|--module) (llm(?:\.\w+)*)\s*(.*)")


def documented_lines() -> list[tuple[str, str]]:
    """(where, command line) for every line of a bash block that runs a command of ours."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            variables = {"start": "0"}
            body = block.group(1).replace("\\\n", " ")
            for number, line in enumerate(body.splitlines()):
                line = re.sub(r"\s+#.*$", "", line).strip()
                if m := re.fullmatch(r"(\w+)=(\S+)", line):
                    variables[m.group(1)] = m.group(2).replace("$(date +%s)", "0")
                    continue
                line = re.sub(r"\$(\w+)", lambda m, known=variables: known.get(m.group(1), m.group(0)), line)
                if re.search(r"-m llm|--module llm|slurm/\w+\.sbatch|tools/\w+\.(py|sh)", line):
                    where = f"{page.relative_to(ROOT)}:{text[: block.start()].count(chr(10)) + 2 + number}"
                    found.append((where, line))
        prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
        for span in re.finditer(
            r"`((?:\.venv/bin/)?python [^`]+|bash tools/[^`]+|sbatch [^`]+|torchrun [^`]+)`", prose
        ):
            line = " ".join(span.group(1).split())
            if "<" not in line and "..." not in line:  # a pattern (python -m llm <command>), not a command line
                found.append((f"{page.relative_to(ROOT)}:{prose[: span.start()].count(chr(10)) + 1}", line))
    return found


def concrete(args: str) -> list[str]:
    """A usage line's arguments as a real command line: optional [...] taken, [X ...] repeats dropped, the first
    of a|b alternatives, placeholders filled (a value key=[a,b] is a list, not an option)."""
    while (
        new := re.sub(r"(?<![=,\w])\[([^\[\]]*)\]", lambda m: "" if "..." in m.group(1) else m.group(1), args)
    ) != args:
        args = new
    words = [w.split("|")[0] if "|" in w and "=" not in w else w for w in shlex.split(args)]
    return [PLACEHOLDERS.get(w, w) for w in words]


class Parsed(Exception):
    pass


def parse_only(monkeypatch, module: str, args: list[str]) -> argparse.Namespace:
    """Run the command's main up to its argument parser and stop there with what it parsed."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(module).main(args)
    return parsed.value.args[0]


def overrides_compose(args: list[str], task: str | None = None) -> None:
    args = [a for a in args if a != "--cfg"]
    if task and not any(a.startswith("task=") for a in args):
        args.insert(0, f"task={task}")
    assert not [a for a in args if a.startswith("-")], f"not Hydra overrides: {args}"
    load_config(args)


LINES = documented_lines()


def test_the_docs_show_commands():
    # the extraction finds the pages' commands (a changed block syntax would make the next test compare nothing)
    shown = " ".join(line for _, line in LINES)
    assert len(LINES) >= 30 and all(f"-m {module}" in shown for module, _ in COMMANDS.values()), shown


@pytest.mark.parametrize("where, line", LINES, ids=[w for w, _ in LINES])
def test_every_documented_command_line_parses(where, line, monkeypatch):
    if m := LAUNCHED.search(line):
        module, args = m.group(1), concrete(m.group(2))
        if module == "pytest":
            return
        assert module in {m for m, _ in COMMANDS.values()}, f"{where}: {module} is not a command"
        if module in ("llm.train", "llm.finetune"):
            overrides_compose(args, "sft" if module == "llm.finetune" else None)
        elif module == "llm.outcome":
            overrides_compose(parse_only(monkeypatch, module, args).overrides)
        elif module == "llm.submit":
            from llm.submit import parse

            _, _, overrides = parse(args)
            overrides_compose(overrides)
        elif args:
            parse_only(monkeypatch, module, args)
        else:  # named in prose, e.g. "prepare those with `python -m llm.data.prepare_data` first"
            assert callable(importlib.import_module(module).main)
    elif m := re.search(r"(slurm/\w+\.sbatch)\s*(.*)", line):
        assert (ROOT / m.group(1)).is_file(), f"{where}: no {m.group(1)}"
        overrides_compose(concrete(m.group(2)), "sft" if "finetune" in m.group(1) else None)
    else:
        m = re.search(r"(tools/(\w+)\.(py|sh))\s*(.*)", line)
        assert (ROOT / m.group(1)).is_file(), f"{where}: no {m.group(1)}"
        if m.group(3) == "py" and m.group(4):
            monkeypatch.syspath_prepend(str(ROOT / "tools"))
            parse_only(monkeypatch, m.group(2), concrete(m.group(4)))


def test_a_wrong_documented_flag_would_fail(monkeypatch):
    # the check above can fail: a flag the parser lacks, a key the config lacks
    with pytest.raises(SystemExit):
        parse_only(monkeypatch, "llm.data.prepare_data", ["--verify", "out", "--no-such-flag"])
    with pytest.raises(Exception, match="no_such_key"):
        overrides_compose(["train.no_such_key=1"])


def test_the_readme_command_table_is_the_entry_table():
    rows = re.findall(r"^\| `([\w-]+)` \| `(llm[.\w]+)` \|", (ROOT / "README.md").read_text(), re.M)
    assert rows == [(name, module) for name, (module, _) in COMMANDS.items()]


def test_the_exit_code_table_in_the_docs_is_the_code_s():
    assert table() in (ROOT / "docs" / "training.md").read_text()
    assert len(table().splitlines()) == len(OUTCOMES) + 2


@pytest.mark.parametrize("name", list(COMMANDS))
def test_python_m_llm_runs_each_command(name, monkeypatch, capsys):
    from llm.__main__ import main

    monkeypatch.setattr(sys, "argv", sys.argv[:])
    with pytest.raises(SystemExit) as ended:
        main([name, "--help"])
    assert ended.value.code in (0, None) and "usage" in capsys.readouterr().out.lower()


def test_python_m_llm_lists_the_commands_and_refuses_an_unknown_one(capsys):
    from llm.__main__ import main

    main([])
    shown = capsys.readouterr().out
    assert all(name in shown for name in COMMANDS)
    with pytest.raises(SystemExit) as ended:
        main(["trian"])
    assert ended.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_every_link_between_pages_resolves():
    links = [
        (page, target)
        for page in PAGES
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if not re.match(r"\w+://", target)
    ]
    assert len(links) >= 15
    broken = [f"{page.relative_to(ROOT)}: {t}" for page, t in links if not (page.parent / t).exists()]
    assert not broken, broken
