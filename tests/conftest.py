"""Shared test set-up: offline, no analytics, and tiny random models built with transformers as oracles."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# evaluations and finetunes record their scores (backend/scoring/history.py): not in the user's own history
os.environ.setdefault("FORNAX_SCORES_DB", os.path.join(tempfile.mkdtemp(prefix="fornax-scores-"), "scores.sqlite"))
