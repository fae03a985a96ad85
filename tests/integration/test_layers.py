"""The package's import layers, checked on every module's source (module level and inside functions).

    kernels <- config <- patterns <- profiles <- patchers <- (bench, evals, calibrate) <- cli

A module may import its own layer and the layers below it, never one above. The tools (bench, evals,
calibrate) sit on one floor: they may use each other, never the CLI. ``_version`` may be imported
from anywhere; the package root (the public facade) only from the tools and the CLI. kernels/,
patterns/ and profiles/ must not import transformers: they are pure tensor ops and data formats.

Run ``python tests/integration/test_layers.py`` to print the import graph by layer.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "sparseprefill"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# Top-level part of the package -> floor. Equal floors may import each other.
LAYERS = {
    "kernels": 0,
    "config": 1,
    "decode_config": 1,  # config's decode options and shared validators, re-exported by config
    "_checks": 1,
    "patterns": 2,
    "profiles": 3,
    "patchers": 4,
    PACKAGE: 5,  # the facade (sparseprefill/__init__.py): exposes patchers/profiles/config
    "bench": 6,
    "evals": 6,
    "calibrate": 6,
    "cli": 7,
    "__main__": 8,
}
ANYWHERE = {"_version"}
NO_TRANSFORMERS = {"kernels", "patterns", "profiles"}


def _part(module: str) -> str:
    """``sparseprefill.kernels.vertical_slash`` -> ``kernels``; the root package -> ``sparseprefill``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    module, is_package = _module_name(path)
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target in (PACKAGE,):
                # ``from . import x`` / ``from sparseprefill import x``: x may be a submodule.
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    is_submodule = (ROOT.parent / candidate.replace(".", "/")).exists() or \
                        (ROOT.parent / (candidate.replace(".", "/") + ".py")).exists()
                    found.append((node.lineno, candidate if is_submodule else target))
            else:
                found.append((node.lineno, target))
    return found


def import_graph() -> tuple[dict[tuple[str, str], int], list[str]]:
    """Counts of imports between top-level parts, and every violation as a readable line."""
    edges: dict[tuple[str, str], int] = defaultdict(int)
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        module, _ = _module_name(path)
        source = _part(module)
        for line, target in _imports(path):
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            top = target.split(".")[0]
            if top == "transformers" and source in NO_TRANSFORMERS:
                violations.append(f"{where}: {source}/ imports transformers")
            if top != PACKAGE:
                continue
            dest = _part(target)
            if dest == source or dest in ANYWHERE:
                continue
            edges[(source, dest)] += 1
            if source not in LAYERS or dest not in LAYERS:
                violations.append(f"{where}: {module} -> {target}: part not in the layer table")
            elif LAYERS[dest] > LAYERS[source]:
                violations.append(f"{where}: {module} imports {target} (floor {LAYERS[dest]} above {LAYERS[source]})")
    return edges, violations


def test_imports_point_down():
    _, violations = import_graph()
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_layer_table_covers_the_package():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    parts = {PACKAGE if p == "__init__" else p for p in parts}
    assert parts - ANYWHERE <= set(LAYERS), f"parts without a floor: {sorted(parts - ANYWHERE - set(LAYERS))}"


def test_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a kernels module importing patchers must be reported."""
    fake = tmp_path / PACKAGE
    (fake / "kernels").mkdir(parents=True)
    (fake / "patchers").mkdir()
    for init in (fake / "__init__.py", fake / "kernels" / "__init__.py", fake / "patchers" / "__init__.py"):
        init.write_text("")
    (fake / "kernels" / "bad.py").write_text("def f():\n    from ..patchers import patch\n")
    (fake / "kernels" / "worse.py").write_text("import transformers\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    _, violations = import_graph()
    assert any("kernels/bad.py:2" in v and "patchers" in v for v in violations), violations
    assert any("kernels/worse.py:1" in v and "transformers" in v for v in violations), violations


if __name__ == "__main__":
    graph, problems = import_graph()
    for floor in sorted(set(LAYERS.values())):
        for part in sorted(p for p, f in LAYERS.items() if f == floor):
            uses = sorted((d, n) for (s, d), n in graph.items() if s == part)
            print(f"{floor} {part:<10} -> " + (", ".join(f"{d} ({n})" for d, n in uses) or "-"))
    print("\n".join(problems) or "no upward imports")
