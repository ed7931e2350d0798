from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # Gradio's queue computes its time estimates with pandas calls that pandas 3 deprecates: not ours to fix.
    quiet = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(quiet)
