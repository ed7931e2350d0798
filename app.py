"""Hugging Face Spaces entry point (README front matter: sdk gradio, app_file app.py): the playground on the
default model. Locally, prefer `python -m playground`."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from playground import create_app, launch_options  # noqa: E402

demo = create_app("default")

if __name__ == "__main__":
    # Spaces sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; launch() reads them.
    demo.launch(**launch_options())
