"""The layout's promise (README, "Layout"): imports run one way, commands -> library -> kernels. The library's
packages stand in layers (config, data, model, parallel, store, evals, training); a module imports only from its own
package or a lower layer; the commands (the modules at the top of llm/, and the data package's own) import no other
command; the kernels import
nothing of llm, nothing imports tools/, and no module imports itself back through others; no function runs past
a screen without its reason."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["kernels", "config", "data", "model", "parallel", "store", "evals", "training"]  # lowest first
COMMANDS = len(LAYERS)  # the commands' layer: above every package


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "llm").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):  # llm/kernels is a link to kernels/, which rglob skips
        found[f"llm.kernels.{path.stem}"] = path
    return found


def imports(name: str, path: Path, top_level_only: bool = False) -> set[str]:
    """The llm modules (or packages) that `name` imports, at any depth of its code or only at its top level."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return found


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The llm module an import name stands for (`llm.data.files.atomic_write` -> `llm.data.files`)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return COMMANDS  # `llm` itself
    if len(parts) == 2 and parts[1] not in LAYERS:
        return COMMANDS
    return LAYERS.index(parts[1])


def commands(known: dict[str, Path]) -> set[str]:
    """The modules run as commands (`python -m llm.<module>`): those with a __main__ block."""
    return {n for n, p in known.items() if n != "llm.__main__" and 'if __name__ == "__main__":' in p.read_text()}


def test_imports_run_one_way():
    known = modules()
    runnable = commands(known)
    assert {"llm.train", "llm.data.prepare_data"} <= runnable
    assert len(known) > 40 and {"llm.train", "llm.training.trainer", "llm.kernels.attention"} <= set(known)
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    wrong = []
    for name, path in known.items():
        for raw in imports(name, path):
            if raw.split(".")[0] in tools:
                wrong.append(f"{name} imports tools/{raw.split('.')[0]}.py")
            target = resolve(raw, known)
            if target is None or target in ("llm", name) or target == name.rpartition(".")[0]:
                continue
            mine, theirs = layer(name), layer(target)
            if name.startswith("llm.kernels") and not target.startswith("llm.kernels"):
                wrong.append(f"{name} (kernels) imports {target}")
            elif name in runnable and target in runnable:
                wrong.append(f"command {name} imports command {target}: share it through the library")
            elif theirs > mine:
                wrong.append(f"{name} ({LAYERS[mine]}) imports {target}, a layer above it")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back():
    known = modules()
    graph = {
        n: {t for r in imports(n, p, top_level_only=True) if (t := resolve(r, known)) not in (None, n, "llm")}
        for n, p in known.items()
    }
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}  # a package's own __init__
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert len(state) == len(known)


def test_the_command_table_names_every_command():
    from llm.__main__ import COMMANDS as TABLE

    known = modules()
    top = {n for n in known if layer(n) == COMMANDS and n not in ("llm", "llm.__main__")}
    assert top <= commands(known), "a module at the top of llm/ is a command"
    assert {module for module, _ in TABLE.values()} == commands(known)


def test_no_function_is_longer_than_a_screen_without_its_reason():
    # 60 lines of body (the docstring aside) at most, unless the line above the function (or its decorators) is
    # a comment `# whole: <why it reads better in one piece>` (a Triton kernel may be)
    long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            size = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if size > 60 and not lines[top - 2].strip().startswith("# whole:"):
                long.append(f"{name}.{node.name}: {size} lines")
    assert not long, "\n".join(long)
