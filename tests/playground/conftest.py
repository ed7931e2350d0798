import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# The playground prepares its fastest faithful path in the background after start-up (playground/prepare.py): not
# in the tests, which would export the default model on every app they open (test_prepare.py turns it on itself).
os.environ.setdefault("FORNAX_PREPARE", "none")


def pytest_collection_modifyitems(config, items):
    # Gradio's queue computes its time estimates with pandas calls that pandas 3 deprecates: not ours to fix.
    quiet = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(quiet)
