"""Scoring: metrics shipped as `evaluate` modules (metrics/<name>/<name>.py, loaded by path, offline), perplexity
with a sliding window on a loaded model, generation and classification evaluation, backend agreement, and a results
history in SQLite. `python -m backend evaluate` is the command line (cli.py); run.evaluate_model the one entry point.

Named `scoring`, not `evaluate`, so that `import evaluate` inside it is the Hugging Face library. Submodules are
imported where used: `import evaluate` takes seconds. The files, label words and classification counts it shares
with training are backend/data's; training imports only history.py from here (to record a finetune's scores)."""
