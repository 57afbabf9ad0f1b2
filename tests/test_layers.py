"""The package's shape: imports point one way (interfaces -> service -> optimize -> modalities -> engines -> store ->
base), the import graph has no cycle (imports inside functions counted), and `aigc runs` starts without torch.

The graph is read from the source with `ast`, so it holds every import, also those a test run never reaches.
`python tests/test_layers.py` prints the layers and the edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = [  # top to bottom: a module may import from its own layer and the layers below it
    ("interfaces", ("aigc.cli", "aigc.__main__", "aigc.quickstart", "aigc.server", "aigc.studio")),
    ("service", ("aigc.service", "aigc.uploads", "aigc.jobs", "aigc.sweep", "aigc.studies", "aigc.report")),
    ("optimize", ("aigc.optimize",)),
    ("modalities", ("aigc.modalities",)),
    ("engines", ("aigc.train", "aigc.sample", "aigc.checkpoint", "aigc.distributed", "aigc.models", "aigc.data",
                 "aigc.evaluate")),
    ("store", ("aigc.store", "aigc.db")),
    ("base", ("aigc.config", "aigc.errors", "aigc.fsutil", "aigc")),
]
# imports of the package's own modules inside functions, with the reason (a measured start-up cost)
LAZY_OK = {
    "aigc.cli": "the service imports torch, transformers and diffusers (seconds); `aigc runs`, `aigc data list` and "
                "--help must not wait for them",
}


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "aigc"):
            return rank
    if module == "aigc":
        return len(LAYERS) - 1
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "aigc").rglob("*.py")):
        name = ".".join(path.with_suffix("").relative_to(SRC).parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported aigc module, line, inside a function) for every import in the file; `from aigc.x import y` is an
    edge to aigc.x.y when that is a module, else to aigc.x."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function |= {id(sub) for sub in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        for target in targets:
            if target == "aigc" or target.startswith("aigc."):
                out.append((target, node.lineno, id(node) in in_function))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {t for t, _, _ in imports(path, set(mods)) if t != name} for name, path in mods.items()}


def test_every_module_imports_only_its_own_layer_and_below():
    wrong = []
    mods = modules()
    for name, path in mods.items():
        for target, line, _ in imports(path, set(mods)):
            if layer_of(target) < layer_of(name):
                wrong.append(f"{name}:{line} imports {target} ({LAYERS[layer_of(target)][0]} is above "
                             f"{LAYERS[layer_of(name)][0]})")
    assert wrong == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_own_module_is_imported_inside_a_function_without_a_reason():
    mods = modules()
    lazy = [f"{name}:{line} imports {target}" for name, path in mods.items() if name not in LAZY_OK
            for target, line, inside in imports(path, set(mods)) if inside]
    assert lazy == []


def test_aigc_runs_starts_without_torch_transformers_or_diffusers(tmp_path):
    script = ("import sys\nfrom aigc.cli import app\n"
              "try:\n    app(['runs'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"AIGC_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "no runs in" in done.stderr


if __name__ == "__main__":
    for rank, (name, prefixes) in enumerate(LAYERS):
        print(f"{rank} {name}: {', '.join(prefixes)}")
    for node, targets in sorted(graph().items()):
        print(f"{node} -> {', '.join(sorted(targets)) or '-'}")
