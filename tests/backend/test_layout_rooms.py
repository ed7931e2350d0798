"""Training and scoring are decoupled through backend/data (issue 19): neither imports the other (training may
record into the scores history), both may import backend.data, and backend.data imports neither."""
from tests.test_layout import graph

HISTORY = "backend.scoring.history"  # a finetune records its final validation there


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "backend" and len(parts) > 1 else None


def crossings(edges: dict[str, set[str]], source: str, target: str, allowed: set[str] = frozenset()) -> list[str]:
    return sorted(f"{name} imports {other}" for name, targets in edges.items() if room_of(name) == source
                  for other in targets if room_of(other) == target and other not in allowed)


def test_training_does_not_import_scoring_but_its_history():
    assert not crossings(graph(), "training", "scoring", {HISTORY})


def test_scoring_does_not_import_training():
    assert not crossings(graph(), "scoring", "training")


def test_data_imports_neither_training_nor_scoring():
    edges = graph()
    assert "backend.data" in edges and "backend.data.files" in edges
    assert not crossings(edges, "data", "training") + crossings(edges, "data", "scoring")


def test_both_read_their_files_through_data():
    """The shared room is used from both sides (the readers are not copied back into either)."""
    edges = graph()
    for room in ("training", "scoring"):
        assert any(room_of(other) == "data" for name, targets in edges.items() if room_of(name) == room
                   for other in targets), room
