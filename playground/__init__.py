"""Fornax playground: owns the Gradio app over `backend` and `export` — tabs, handlers, rendering, the shared
model slot. UI glue only: no model, export or training logic lives here.

Names are imported on first use, so `python -m playground --help` answers without loading torch and gradio.
"""
import os

# Before gradio is imported anywhere: no analytics, no version check, nothing leaves the machine at start-up.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

__all__ = ["create_app", "build_app", "launch_options", "current", "ModelSlot"]


def create_app(model: str | None = "default", dtype: str | None = None):
    """The app with `model` already loaded. If that load fails the app still opens, showing why in the Model tab."""
    import backend

    from .state import current
    from .ui import build_app

    if model:
        try:
            current.load(model, dtype=dtype)
        except backend.FornaxError as e:
            print(f"playground: could not load {model!r}: {e}")
    return build_app()


def __getattr__(name):
    if name in ("build_app", "launch_options"):
        from . import ui
        return getattr(ui, name)
    if name in ("current", "ModelSlot"):
        from . import state
        return getattr(state, name)
    raise AttributeError(f"module 'playground' has no attribute {name!r}")
