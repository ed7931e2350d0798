"""Shared test set-up: offline, no analytics, and tiny random models built with transformers as oracles."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# evaluations and finetunes record their scores (backend/scoring/history.py): not in the user's own history
os.environ.setdefault("FORNAX_SCORES_DB", os.path.join(tempfile.mkdtemp(prefix="fornax-scores-"), "scores.sqlite"))


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: long fuzzing runs, deselected unless asked for with `-m fuzz`")


def pytest_collection_modifyitems(config, items):
    """The long fuzz runs are for a person who asks (`pytest -m fuzz`); CI runs their short twins."""
    if "fuzz" in (config.getoption("-m") or ""):
        return
    kept = [i for i in items if i.get_closest_marker("fuzz") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("fuzz") is not None])
        items[:] = kept
