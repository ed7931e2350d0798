"""Run the playground in-process on a free loopback port, the way a user's browser or gradio_client meets it."""
from __future__ import annotations

import socket
from contextlib import contextmanager

# Every keyword of the parameters panel, as gradio_client passes them (by the handlers' parameter names).
PANEL = dict(backend_name="eager", max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, min_p=0.02,
             repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1, stop=[], seed=1234, num_samples=1)


def backend_kwargs(**panel) -> dict:
    """The same settings as `h.generate` keyword arguments, for calling the backend directly."""
    kwargs = {**PANEL, **panel}
    kwargs["backend"] = kwargs.pop("backend_name")
    kwargs["stop"] = [s.replace("\\n", "\n") for s in kwargs["stop"]]
    return kwargs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo):
    """The app at http://127.0.0.1:<port>/ for the duration of the block."""
    from playground import launch_options

    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextmanager
def serving_asgi(app):
    """An ASGI app (the playground with its OpenAI API: playground.openai_api.server) under uvicorn on a thread."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
