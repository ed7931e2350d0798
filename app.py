"""Hugging Face Spaces entry point (README front matter: sdk gradio, app_file app.py): the playground on the
default model. Locally, prefer `python -m playground`."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from playground import choose_mode, create_app  # noqa: E402
from playground.openai_api import server  # noqa: E402

# Public on a Space (SPACE_ID) or when served beyond loopback (e.g. Docker on 0.0.0.0), unless FORNAX_PUBLIC says.
choose_mode(None, os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
demo = create_app("default")

if __name__ == "__main__":
    # The app and its OpenAI-compatible API (/v1) in one server, on what Spaces sets in GRADIO_SERVER_NAME / _PORT.
    import uvicorn

    uvicorn.run(server(demo), host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), log_level="warning",
                timeout_graceful_shutdown=3)
