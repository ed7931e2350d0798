"""Shared test set-up: offline, no analytics, and tiny random models built with transformers as oracles."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# evaluations and finetunes record their scores (backend/scoring/history.py): not in the user's own history
os.environ.setdefault("FORNAX_SCORES_DB", os.path.join(tempfile.mkdtemp(prefix="fornax-scores-"), "scores.sqlite"))


ON_REQUEST = ("fuzz", "slow")  # markers whose tests run only when `-m` names them


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: long fuzzing runs, deselected unless asked for with `-m fuzz`")
    config.addinivalue_line("markers", "slow: measurements over the real default model that take minutes on two "
                                       "cores, deselected unless asked for with `-m slow`")


def pytest_collection_modifyitems(config, items):
    """The long fuzz runs and the slow measurements are for a person who asks (`pytest -m fuzz`, `-m slow`); CI
    runs their short twins."""
    asked = config.getoption("-m") or ""
    skipped = [m for m in ON_REQUEST if m not in asked]
    dropped = [i for i in items if any(i.get_closest_marker(m) is not None for m in skipped)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]
