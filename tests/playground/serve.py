"""Run the playground in-process on a free loopback port, the way a user's browser or gradio_client meets it."""
from __future__ import annotations

import socket
from contextlib import contextmanager

# Every keyword of the parameters panel, as gradio_client passes them (by the handlers' parameter names).
PANEL = dict(runner_name="eager", max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, min_p=0.02,
             repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1, stop=[], seed=1234, num_samples=1)


def backend_kwargs(**panel) -> dict:
    """The same settings as `h.generate` keyword arguments, for calling the backend directly."""
    kwargs = {**PANEL, **panel}
    kwargs["backend"] = kwargs.pop("runner_name")
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


@contextmanager
def api_only_server(folder, log, env: dict | None = None, timeout_s: float = 180):
    """(base URL, process, log path) of `python -m playground --api-only --model <folder> --port <free>` in its own
    process (loopback), once it answers /v1/models; killed afterwards if still running."""
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FORNAX_PUBLIC": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "playground", "--api-only", "--model", str(folder),
                                 "--port", str(port)], cwd=Path(__file__).resolve().parents[2], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"the server exited early:\n{Path(log).read_text()}"
            assert time.monotonic() < deadline, f"the server did not answer in time:\n{Path(log).read_text()}"
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        yield base, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
