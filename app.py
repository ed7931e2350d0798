"""Hugging Face Spaces entry point (README front matter: sdk gradio, app_file app.py): the playground on the
default model. Locally, prefer `python -m playground`."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from playground import choose_mode, create_app, launch_options  # noqa: E402

# Public on a Space (SPACE_ID) or when served beyond loopback (e.g. Docker on 0.0.0.0), unless FORNAX_PUBLIC says.
choose_mode(None, os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
demo = create_app("default")

if __name__ == "__main__":
    # Spaces sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; launch() reads them.
    demo.launch(**launch_options())
