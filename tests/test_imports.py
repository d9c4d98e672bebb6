"""The import graph of the package, read from the source (imports inside functions included): the core
never imports the trainer, and no module imports itself back through others.

Floors, bottom up: gptoss.errors, gptoss.config, gptoss.mxfp4 ... gptoss.model, gptoss.adapter,
gptoss.load (the core, with the Triton kernels in gptoss.kernels); gptoss.train (the trainer, on the
core); gptoss.cli, gptoss.__main__, gptoss.demo and gptoss.app (the commands, the demo and its page,
on both)."""

import ast
from pathlib import Path

from conftest import package_dirs

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"gptoss": ROOT / "gptoss", **{name: ROOT / folder for name, folder in package_dirs().items()}}
# may import the trainer: they sit on top of both
ON_TOP = {"gptoss.cli", "gptoss.__main__", "gptoss.demo", "gptoss.app"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body; `from P import name` counts as
    an import of P.name where that is a module, else of P."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_walk_sees_every_module_and_function_level_imports():
    edges = graph()
    assert {
        "gptoss.model",
        "gptoss.adapter",
        "gptoss.kernels.moe",
        "gptoss.train.trainer",
        "gptoss.cli",
    } <= edges.keys()
    assert "gptoss.kernels.moe" in edges["gptoss.model"]  # imported inside MoE.forward
    assert "gptoss.adapter" in edges["gptoss.train.trainer"]


def test_the_core_never_imports_the_trainer():
    bad = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if not name.startswith("gptoss.train") and name not in ON_TOP
        for target in targets
        if target.startswith("gptoss.train")
    ]
    assert not bad, bad


def test_no_import_cycles():
    assert not cycles(graph())


def test_the_checks_catch_what_they_look_for():
    # a planted edge back from the core to the trainer, and a planted circle
    edges = graph()
    edges["gptoss.model"] = edges["gptoss.model"] | {"gptoss.train.trainer"}
    assert cycles(edges)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
