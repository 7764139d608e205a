"""The architecture's import contract: no import cycles inside fs_mllm, and no import up the layers.

Why: the library sits below the commands, patching below the saved format, the format below the models
that use it; an import from a lower layer into a higher one (even inside a function, where Python only
notices at run time) is how the old hub <-> models <-> patching knot grew. Run from the repository root:

    python .ci/check_imports.py            # exit 0, or 1 with every offending import named

Every import counts: module level or inside a function, ``import x``, ``from x import y``, relative ones,
and a string literal that is exactly an fs_mllm module name (``importlib.import_module`` dispatch). An
import of ``a.b.c`` also counts as importing the packages ``a.b`` and ``a`` (their ``__init__`` runs
first), except the importer's own parents, which run before it anyway; ``from fs_mllm import name`` is an
import of the package itself, the top layer. Not seen: module names computed at run time (an f-string or
a concatenation passed to ``importlib.import_module``; ``fs_mllm.models`` builds its lazy names that way,
inside its own package): name a module literally where it crosses a layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterable, Optional

PACKAGE = "fs_mllm"

LAYERS: list[tuple[str, tuple[str, ...]]] = [  # top first: a module imports its own layer and the ones below
    ("application", ("fs_mllm", "fs_mllm.cli", "fs_mllm.commands", "fs_mllm.demo")),
    ("experiments", ("fs_mllm.evaluation", "fs_mllm.defense", "fs_mllm.booster.through_lm")),
    ("attacks", ("fs_mllm.attacks", "fs_mllm.surrogates", "fs_mllm.surrogate_training")),
    ("booster training", ("fs_mllm.booster.data", "fs_mllm.booster.encoders", "fs_mllm.booster.losses",
                          "fs_mllm.booster.checkpoint", "fs_mllm.booster.training", "fs_mllm.booster.run")),
    ("models", ("fs_mllm.models",)),
    ("hub", ("fs_mllm.hub",)),
    ("certification", ("fs_mllm.certify", "fs_mllm.answer_certify")),
    ("patching", ("fs_mllm.patching",)),
    ("smoothing", ("fs_mllm.booster", "fs_mllm.booster.model", "fs_mllm.smoothed_path", "fs_mllm.smoothing", "fs_mllm.normalization",
                   "fs_mllm.adapters", "fs_mllm.testing")),
    ("foundations", ("fs_mllm.config", "fs_mllm.compat", "fs_mllm.stats", "fs_mllm.arguments", "fs_mllm.answers",
                     "fs_mllm.image_io", "fs_mllm.synthetic", "fs_mllm.data", "fs_mllm.results", "fs_mllm.version")),
]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package under ``root`` (the repository)."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: Iterable[str]) -> dict[str, int]:
    """The fs_mllm modules ``name`` imports -> the first line that does."""
    known = set(modules)
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: Optional[str], line: int, explicit: bool = False) -> None:
        # importing a.b.c runs a/__init__ and a/b/__init__ first: those packages are imported too, unless they
        # are the importer's own parents (run before it anyway); the package root only by a name of its own
        # (``from fs_mllm import patch_model`` reaches the top layer)
        if target not in known:
            return
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            package = ".".join(parts[:depth])
            own_parent = name.startswith(package + ".")
            if package in known and package != name and (not own_parent or (package == target == PACKAGE and explicit)):
                found.setdefault(package, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, explicit=alias.name == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known]
            for target in submodules:
                add(target, node.lineno)
            if len(submodules) < len(node.names):  # names defined in ``source`` itself
                add(source, node.lineno, explicit=True)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            add(node.value, node.lineno)  # a module named by string, e.g. for importlib.import_module
    return found


def layer_of(name: str) -> Optional[int]:
    """The index of the layer that holds ``name`` (its longest listed prefix; the package itself, and a package
    whose modules are listed one by one, such as ``fs_mllm.booster``, only by name), 0 = top."""
    listed = {member for _, members in LAYERS for member in members}
    best, where = -1, None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            split = member == PACKAGE or any(other.startswith(member + ".") for other in listed)
            inside = name.startswith(member + ".") and not split
            if (name == member or inside) and len(member) > best:
                best, where = len(member), index
    return where


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def problems(root: Path) -> list[str]:
    modules = module_names(root)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    out = []
    for name in sorted(modules):
        if layer_of(name) is None:
            out.append(f"{name}: in no layer of .ci/check_imports.py's LAYERS; add it to the layer it belongs to")
    for name, targets in sorted(graph.items()):
        here = layer_of(name)
        for target, line in sorted(targets.items()):
            there = layer_of(target)
            if here is not None and there is not None and there < here:
                out.append(f"{modules[name].relative_to(root)}:{line}: {name} (layer {LAYERS[here][0]!r}) imports "
                           f"{target} (layer {LAYERS[there][0]!r}, above it): move the shared piece down, or call "
                           "the lower layer from the higher one")
    for component in cycles(graph):
        edges = [f"{a} -> {b} (line {graph[a][b]})" for a in component for b in graph[a] if b in component]
        out.append(f"import cycle among {', '.join(component)}: " + "; ".join(edges))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    found = problems(root)
    for line in found:
        print(line)
    if not found:
        print(f"{PACKAGE}: {len(module_names(root))} modules in {len(LAYERS)} layers; no cycles, no upward imports")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
