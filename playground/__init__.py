"""Fornax playground: owns the Gradio app over `backend` and `export` — tabs, handlers, rendering, the shared
model slot. UI glue only: no model, export or training logic lives here.

Names are imported on first use, so `python -m playground --help` answers without loading torch and gradio.
"""
import os

# Before gradio is imported anywhere: no analytics, no version check, nothing leaves the machine at start-up.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

__all__ = ["create_app", "build_app", "launch_options", "current", "ModelSlot", "choose_mode"]


def choose_mode(public: bool | None, host: str | None) -> bool:
    """Decide the deployment mode and record it in FORNAX_PUBLIC (which backend.limits reads): `public` when given
    (--public / --private); else FORNAX_PUBLIC if set; else public on a Hugging Face Space (SPACE_ID) or when
    serving on anything but loopback, where other machines can reach the app."""
    if public is None:
        flag = os.environ.get("FORNAX_PUBLIC", "").strip()
        if flag:
            public = flag.lower() not in ("0", "false", "no", "off")
        else:
            public = bool(os.environ.get("SPACE_ID")) or not is_loopback(host or "127.0.0.1")
    os.environ["FORNAX_PUBLIC"] = "1" if public else "0"
    return public


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # another host name: may be reachable from elsewhere
        return False


def create_app(model: str | None = "default", dtype: str | None = None, prepare: str | None = None,
               prepare_max_kl: float | None = None):
    """The app with `model` already loaded. If that load fails the app still opens, showing why in the Model tab.
    `prepare` ("fast" or "none"; default FORNAX_PREPARE, else fast): after the app is built, prepare the model's
    fastest path that is as faithful as llama.cpp in the background (playground/prepare.py; `prepare_max_kl`
    overrides the KL bound)."""
    import importlib
    import threading

    import backend

    from . import prepare as preparation
    from .state import current

    # Gradio's import (seconds, mostly Python) overlaps the model's load (mostly numpy and torch, which release the
    # GIL): a cold start reaches its page sooner.
    ui_import = threading.Thread(target=importlib.import_module, args=("playground.ui",), daemon=True)
    ui_import.start()
    fast = preparation.mode(prepare) == "fast"
    if model:
        try:
            current.load(model, dtype=dtype)
        except backend.FornaxError as e:
            print(f"playground: could not load {model!r}: {e}")
    ui_import.join()
    from .ui import build_app

    demo = build_app()
    if fast and current.handle is not None:
        bound = {} if prepare_max_kl is None else {"max_kl": prepare_max_kl}
        preparation.start(current.handle, **bound)
    return demo


def __getattr__(name):
    if name in ("build_app", "launch_options"):
        from . import ui
        return getattr(ui, name)
    if name in ("current", "ModelSlot"):
        from . import state
        return getattr(state, name)
    raise AttributeError(f"module 'playground' has no attribute {name!r}")
