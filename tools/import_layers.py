"""The package's layout drawn from its imports: rooms, floors, circles and imports that point up.

A room is a module of ``lora_kernels`` (a package counts as its ``__init__``); an edge is any
``import`` of one room by another, at module level or inside a function (a lazy import is still
a dependency). Floors are the longest-path layering of the import graph: floor 0 imports no
room, every room sits one floor above the highest room it imports. A circle is a strongly
connected group of two or more rooms. An import points up when it goes from a lower tier of
DESIGN.md's layout to a higher one (``TIERS``, bottom first).

    python tools/import_layers.py                  # module by module
    python tools/import_layers.py --grain package  # a room per subpackage (backends per backend)
    python tools/import_layers.py --json           # the same as JSON

At the package grain the serving package is two rooms, as DESIGN.md draws it: its low half
(``state``, ``exact_merge``: what the layers read) and the rest (cache, switch).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lora_kernels"

# DESIGN.md's tiers, bottom first; a room's tier is that of its longest matching prefix. The
# serving state and exact merges sit below the layers that read them (issue: "state.py ...
# lowest"); the host cache and the switch sit above the models.
TIERS = [
    (
        "lora_kernels.envs",
        "lora_kernels._constants",
        "lora_kernels._versions",
        "lora_kernels.reference",
    ),
    ("lora_kernels.backends",),
    ("lora_kernels._checks",),
    ("lora_kernels.ops",),
    ("lora_kernels.functional",),
    ("lora_kernels.serving.exact_merge", "lora_kernels.serving.state", "lora_kernels.serving.low"),
    ("lora_kernels.layers",),
    ("lora_kernels.models",),
    ("lora_kernels.serving",),
    ("lora_kernels.integrations",),
    ("lora_kernels.bench", "lora_kernels.demo", "lora_kernels.cli", "lora_kernels"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rooms() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    if node.level:
        base = importer.split(".")
        if not is_pkg:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = []
    for alias in node.names:  # ``from pkg import submodule`` imports the submodule
        sub = f"{target}.{alias.name}"
        if sub in known:
            found.append(sub)
    if target in known and len(found) < len(node.names):
        found.append(target)
    return found


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, is_pkg, node, set(known))
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in known]
            else:
                continue
            graph[mod].update(t for t in targets if t != mod)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more rooms (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Longest-path floor of every room (the rooms of a circle share one floor)."""
    groups = {m: frozenset([m]) for m in graph}
    for group in circles(graph):
        for m in group:
            groups[m] = frozenset(group)
    floor: dict[frozenset, int] = {}

    def height(g: frozenset, seen: frozenset = frozenset()) -> int:
        if g in floor:
            return floor[g]
        below = {groups[t] for m in g for t in graph[m]} - {g}
        floor[g] = 1 + max((height(b, seen | {g}) for b in below), default=-1)
        return floor[g]

    return {m: height(groups[m]) for m in graph}


def tier(mod: str) -> int:
    best, best_len = len(TIERS) - 1, -1
    for i, prefixes in enumerate(TIERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def up_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if tier(b) > tier(a))


SERVING_LOW = ("lora_kernels.serving.state", "lora_kernels.serving.exact_merge")


def package_room(mod: str) -> str:
    """The package-grain room of module ``mod``."""
    parts = mod.split(".")
    if mod in SERVING_LOW:
        return "lora_kernels.serving.low"
    if len(parts) >= 3 and parts[1] == "backends":
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def coarsen(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    coarse: dict[str, set[str]] = {}
    for a, targets in graph.items():
        room = package_room(a)
        coarse.setdefault(room, set()).update(package_room(b) for b in targets)
    for room, targets in coarse.items():
        targets.discard(room)
    return coarse


def layout(grain: str = "module") -> dict:
    known = rooms()
    graph = imports(known)
    if grain == "package":
        graph = coarsen(graph)
    fl = floors(graph)
    return {
        "rooms": len(graph),
        "floors": max(fl.values()) + 1,
        "circles": circles(graph),
        "up_imports": up_imports(graph),
        "floor_of": fl,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--grain", choices=("module", "package"), default="module")
    args = parser.parse_args(argv)
    found = layout(args.grain)
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    print(
        f"{found['rooms']} rooms on {found['floors']} floors, {len(found['circles'])} circles, "
        f"{len(found['up_imports'])} imports pointing up"
    )
    for floor in range(found["floors"] - 1, -1, -1):
        here = sorted(m for m, f in found["floor_of"].items() if f == floor)
        print(f"  floor {floor:2d}: {', '.join(m.removeprefix(PACKAGE + '.') for m in here)}")
    for group in found["circles"]:
        print("  circle: " + " <-> ".join(group))
    for a, b in found["up_imports"]:
        print(f"  up: {a} -> {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
