"""The house has no way back up: every import of moeq's own code points down the layers.

Read from the source's own import statements (module level and inside functions alike), so the
rule stays true as code moves. Layers, lowest first: numerics and shared helpers, the plan, the
adapters (which describe models and never build modules), kernels and config, the packed modules,
io, calibration, allocation, the public API, then the commands' logic and the CLI on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moeq

ROOT = Path(moeq.__file__).parent
LAYER = {
    "quant": 0, "atomic": 0, "files": 0, "threads": 0, "executors": 0,
    "plan": 1,
    "models": 2, "targets": 2,
    "kernels": 3, "config": 3,
    "modules": 4,
    "io": 5,
    "calibrate": 6,
    "allocate": 7,
    "api": 8,
    "analysis": 9, "eval": 9, "export": 9, "train": 9, "demo": 10,
    "cli": 11,
    "": 12,  # moeq/__init__.py: the public API's re-exports
}


def _imports() -> list[tuple[str, str, str, int]]:
    """``(file, importing unit, imported unit, line)`` for every relative import between units."""
    found = []
    for file in sorted(ROOT.rglob("*.py")):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        unit = parts[0] if len(parts) > 1 or parts[0] != "__init__" else ""
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = base + (node.module.split(".") if node.module else [])
            names = [alias.name for alias in node.names]
            if not target:  # ``from . import x`` at the top: x is the unit
                target = [names[0]]
            found.append((str(file.relative_to(ROOT)), unit, target[0], node.lineno, names))
    return found


def test_every_unit_has_a_layer() -> None:
    units = {unit for _, unit, _, _, _ in _imports()} | {target for _, _, target, _, _ in _imports()}
    assert units <= set(LAYER), sorted(units - set(LAYER))


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{file}:{line} ({unit}, layer {LAYER[unit]}) imports {target} (layer {LAYER[target]})"
        for file, unit, target, line, _ in _imports()
        if unit != target and LAYER[target] > LAYER[unit]
    ]
    assert not upward, "\n".join(upward)


def test_no_cycles_between_units() -> None:
    edges: dict[str, set[str]] = {}
    for _, unit, target, _, _ in _imports():
        if unit != target:
            edges.setdefault(unit, set()).add(target)

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    cycles = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if reaches(b, a))
    assert not cycles, cycles


def test_no_private_names_cross_units() -> None:
    private = [
        f"{file}:{line} imports {name} from {target}"
        for file, unit, target, line, names in _imports() if unit != target
        for name in names if name.startswith("_")
    ]
    assert not private, "\n".join(private)
