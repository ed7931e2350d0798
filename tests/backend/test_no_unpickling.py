"""No project code path can run code from a file: every `torch.load` passes `weights_only=True`, nothing calls
`pickle.load(s)` (or numpy with `allow_pickle=True`), and nothing passes `trust_remote_code=True`.
Checked on the syntax trees of every Python file outside tests/, so a new call site cannot slip in."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Each unsafe call in `source` as 'file:line: what'."""
    found = []
    tree = ast.parse(source, filename)
    aliases = {}  # `import pickle as p`, `from torch import load`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        name = aliases.get(head, head) + (f".{rest}" if rest else "")
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}"
        if name == "torch.load" and not _true(kwargs.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if name.split(".")[0] in PICKLE_MODULES and name.rsplit(".", 1)[-1] in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where}: {name}")
        if name in ("numpy.load", "np.load") and _true(kwargs.get("allow_pickle")):
            found.append(f"{where}: numpy.load with allow_pickle=True")
        if "trust_remote_code" in kwargs and not (isinstance(kwargs["trust_remote_code"], ast.Constant)
                                                  and kwargs["trust_remote_code"].value is False):
            found.append(f"{where}: trust_remote_code not False")
    return found


def project_files() -> list[Path]:
    skip = {"tests", ".venv", ".git", "node_modules", "shared"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def test_no_project_code_unpickles_or_trusts_remote_code():
    files = project_files()
    assert any(p.name == "loading.py" for p in files) and len(files) > 20
    found = [hit for p in files for hit in unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "\n".join(found)


def test_the_scanner_finds_each_unsafe_call():
    bad = """
import torch, pickle as pk
from torch import load as tl
import numpy as np
torch.load("x")
torch.load("x", weights_only=False)
tl("x")
pk.loads(b"")
np.load("x", allow_pickle=True)
AutoModel.from_pretrained("x", trust_remote_code=True)
AutoModel.from_pretrained("x", trust_remote_code=flag)
torch.load("x", weights_only=True)
AutoModel.from_pretrained("x", trust_remote_code=False)
"""
    hits = unsafe_calls(bad)
    assert [int(h.split(":")[1]) for h in hits] == [5, 6, 7, 8, 9, 10, 11], hits
