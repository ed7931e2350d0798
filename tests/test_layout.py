"""The rooms' import rules, read from the source: no import cycles between our modules, and arrows one way
(playground -> export -> backend -> kernels and native; kernels imports torch and triton only, native the standard
library and numpy only)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ["native", "kernels", "backend", "export", "playground"]   # each may import only rooms to its left
FORBIDDEN_PACKAGES = {"backend": {"gradio", "export", "playground"}, "kernels": {"backend", "export", "playground",
                                                                                 "gradio", "native"},
                      "native": {"backend", "export", "playground", "gradio", "kernels", "torch", "triton"}}


def modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for f in (ROOT / room).rglob("*.py") if (ROOT / room).is_dir() else []:
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Every module (ours or not) that `name` imports, anywhere in its body."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for a in node.names:
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        edges[name] = set()
        for target in imports(name, path, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                edges[name].add(target)
    return edges


def test_no_import_cycles():
    edges = graph()
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_rooms_import_one_way():
    known = modules()
    wrong = []
    for name, path in known.items():
        room = name.split(".")[0]
        for target in imports(name, path, known):
            top = target.split(".")[0]
            if top in ROOMS and ROOMS.index(top) > ROOMS.index(room):
                wrong.append(f"{name} imports {target}")
            if top in FORBIDDEN_PACKAGES.get(room, ()):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_private_names_imported_across_modules():
    known = modules()
    wrong = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                wrong += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, "\n".join(wrong)


# backend's own rooms, lowest first: each may import only rooms to its left (and the root's errors, limits, budget).
# The root's handle and loading sit above them; training, scoring and bench above those; only bench and the root's
# __main__ import bench.
SUBROOMS = ["disk", "models", "formats", "generation", "runners"]
LOW_ROOT = {"backend.errors", "backend.limits", "backend.budget"}


def subroom(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "backend" or len(parts) < 2:
        return None
    return parts[1] if len(parts) > 2 or parts[1] in SUBROOMS + ["data", "training", "scoring", "bench"] else "root"


def test_backend_subrooms_import_downwards_only():
    wrong = []
    for name, targets in graph().items():
        room = subroom(name)
        for target in targets:
            other = subroom(target)
            if room is None or other is None or other == room:
                continue
            if room in SUBROOMS + ["data"]:
                allowed = SUBROOMS[:SUBROOMS.index(room)] if room in SUBROOMS else ["disk", "models", "formats"]
                if not (other in allowed or target in LOW_ROOT):
                    wrong.append(f"{name} imports {target}")
            if other == "bench" and not (room == "bench" or name == "backend.__main__"):
                wrong.append(f"{name} imports {target} (benchmarks are imported by the CLI only)")
    assert not wrong, "\n".join(sorted(wrong))
