"""The house's import rules, read from the source (ast), not from what happens to be imported.

    encoder/          imports nothing of ours
    videollm/         encoder
    videollm/data/    encoder, videollm
    eval/             … videollm/data
    training/         … eval
    training.pipeline the release: everything; nothing imports it
    demo/             encoder, videollm, videollm/data

No import cycle between modules, no two packages importing each other, and imports of our own
modules sit at the top of a file (a function-local one is how a cycle hides): a few are allowed
where a heavy optional part loads only when used.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("encoder", "videollm", "training", "eval", "demo")
MAX_LOCAL_IMPORTS = 20

# Layer of a module: a module may import modules of its own layer or below (demo is checked apart).
LAYERS = [("training.pipeline", 5), ("training", 4), ("eval", 3), ("videollm.data", 2), ("videollm", 1), ("encoder", 0)]
DEMO_MAY_IMPORT = ("encoder", "videollm", "demo")  # videollm.data included


def layer_of(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    """The modules an ImportFrom names (absolute), e.g. `from videollm.data import synth` → both
    `videollm.data` and `videollm.data.synth` when the latter is a module of ours."""
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = [target]
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        if (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                ROOT / Path(*candidate.split(".")) / "__init__.py").is_file():
            out.append(candidate)
    return out


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def scan() -> tuple[dict[str, set[str]], dict[str, int]]:
    """(module → the modules of ours it imports, module → how many of those imports sit in a function)."""
    edges: dict[str, set[str]] = {}
    local: dict[str, int] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(), str(path))
            is_package = path.name == "__init__.py"
            functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            in_function = {id(n) for f in functions for n in ast.walk(f)}
            targets: set[str] = set()
            n_local = 0
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = _resolve(module, node, is_package)
                else:
                    continue
                names = [n for n in names if _ours(n)]
                if names:
                    targets.update(names)
                    n_local += id(node) in in_function
            edges[module] = targets - {module}
            local[module] = n_local
    return edges, local


EDGES, LOCAL = scan()


def _violations() -> list[str]:
    bad = []
    for module, targets in EDGES.items():
        for target in targets:
            if module.startswith("demo"):
                ok = target.split(".")[0] in DEMO_MAY_IMPORT
            elif module == "videollm.cli":
                ok = target.split(".")[0] == "encoder"  # subcommands are imported by name, lazily
            else:
                ok = layer_of(target) is not None and layer_of(target) <= layer_of(module)
            if not ok:
                bad.append(f"{module} imports {target}")
    return sorted(bad)


def test_layers_import_only_downwards():
    assert _violations() == []


def test_no_module_imports_the_release_pipeline():
    assert sorted(m for m, ts in EDGES.items() if "training.pipeline" in ts) == []


def test_no_import_cycles():
    # Tarjan-free: a module is on a cycle when it reaches itself.
    def reach(start: str) -> set[str]:
        seen, todo = set(), list(EDGES.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(EDGES.get(m, ()))
        return seen

    assert sorted(m for m in EDGES if m in reach(m)) == []


def test_no_two_packages_import_each_other():
    pkg_edges = {(a.split(".")[0] if not a.startswith("videollm.data") else "videollm.data",
                  b.split(".")[0] if not b.startswith("videollm.data") else "videollm.data")
                 for a, ts in EDGES.items() for b in ts}
    pkg_edges = {(a, b) for a, b in pkg_edges if a != b}
    assert sorted((a, b) for a, b in pkg_edges if (b, a) in pkg_edges) == []


def test_few_function_local_imports_of_our_modules():
    where = {m: n for m, n in LOCAL.items() if n}
    assert sum(where.values()) <= MAX_LOCAL_IMPORTS, where


@pytest.mark.parametrize("module,target,expected", [
    ("encoder.scan", "videollm.llm", False),
    ("videollm.chat", "eval.qa", False),
    ("eval.qa", "videollm.data.synth", True),
    ("videollm.data.synth", "eval.answer", False),
    ("training.finetune", "eval.answer", True),
    ("eval.niah", "training.ground", False),
])
def test_the_rule_itself(module, target, expected):
    """The layer rule would catch an upward import (so the tests above can fail)."""
    assert (layer_of(target) <= layer_of(module)) is expected
