"""Per-visitor ownership (issue 18, items 8 and 10 and the ownership items): a signed visitor cookie that survives a
reload and cannot be forged; jobs, grants, history, uploads and downloads that belong to their visitor; no server
path on any page in public mode; the operator's FORNAX_MODEL_SWAP; per-visitor tables that stay bounded."""
import os
import re
import subprocess
import sys
import tempfile

import gradio as gr
import pytest

from backend.errors import ModelLoadError
from backend.scoring.history import History
from backend.training import jobs as jobs_module
from playground import deployment
from playground.errors import user_errors
from playground.tabs import evaluate, export, finetune, model
from tests.backend import bad_files as bf

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

FORM = dict(data_path="", mode="pretrain", task="auto", model="", preset="tiny-llama", steps=10, lr=0,
            batch_size=2, seq_len=32, lora_r=8, eval_every=0, sample_prompts="", out="")


@pytest.fixture
def public(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_SCORES_DB", str(tmp_path / "scores.sqlite"))
    return tmp_path


@pytest.fixture
def sleeping_jobs(monkeypatch):
    """Training processes that only sleep (job_dir in their command line, as the job manager checks), so ownership
    is tested without training; every one is killed afterwards."""
    started = []
    real_popen = subprocess.Popen

    def popen(args, **kwargs):
        job_dir = args[args.index("--job-dir") + 1]
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(120)", "--job-dir", job_dir], **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(jobs_module.subprocess, "Popen", popen)
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def browser(cookie: str | None, page: str) -> gr.Request:
    """A request of one page load (`page`: its session hash) from a browser holding `cookie`."""
    headers = {"cookie": f"{deployment.VISITOR_COOKIE}={cookie}"} if cookie else {}
    return gr.Request(session_hash=page, headers=headers)


def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return str(path)


def refused(call) -> str:
    with pytest.raises(gr.Error) as e:
        call()
    return e.value.message


# --- who a visitor is ---------------------------------------------------------------------------------------------
def test_a_reload_keeps_the_job_and_another_or_a_forged_cookie_does_not(public, sleeping_jobs):
    cookie = deployment.mint_cookie()
    raw = cookie.split(".")[0]
    first_page, reloaded = browser(cookie, "page-1"), browser(cookie, "page-2")
    finetune.start_job(corpus(public), **FORM, request=first_page)
    job = finetune.manager().latest(deployment.job_owner(reloaded))
    assert job is not None and finetune.manager().state(job)["status"] in ("starting", "running")
    strangers = [browser(None, "page-3"), browser(deployment.mint_cookie(), "page-4"),
                 browser(raw, "page-5"), browser(f"{raw}.{'0' * 32}", "page-6"),
                 browser(f"{raw}.{cookie.split('.')[1][:-1]}x", "page-7")]  # no, a forged, a near signature
    for stranger in strangers:
        assert "no training job of yours to cancel" in refused(lambda: user_errors(finetune.cancel_job)(stranger))
        status = finetune.poll(stranger)[0]
        assert job not in status and "another visitor" in status
    status = finetune.cancel_job(reloaded)[0]  # the reloaded page still owns it
    assert job in status and (finetune.manager().job_dir(job) / "cancel").exists()


def test_callers_without_a_cookie_are_their_own_visitors():
    assert deployment.visitor_id(browser(None, "a")) != deployment.visitor_id(browser(None, "b"))
    nobody = gr.Request()  # an API call with neither a cookie nor a session (/gradio_api/run/*)
    assert deployment.visitor_id(nobody) != deployment.visitor_id(gr.Request())
    cookie = deployment.mint_cookie()
    seen = deployment.visitor_id(browser(cookie, "page-x"))
    assert deployment.visitor_id(browser(cookie, "page-y")) == seen  # the cookie is who it is, whatever its session
    from playground.streaming import session_key

    assert session_key(nobody) != session_key(gr.Request())  # nor one Stop flag for all of them


def test_the_middleware_signs_cookies_owns_files_and_caps_files_per_upload(public, monkeypatch):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def anything(request):
        if request.url.path.endswith("/upload"):
            form = await request.form()
            return PlainTextResponse(f"{len(form.getlist('files'))} files")
        return PlainTextResponse("served")

    app = Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST"])])
    app.add_middleware(deployment.VisitorCookies)
    fresh = TestClient(app)
    first = fresh.get("/")
    cookie = first.cookies.get(deployment.VISITOR_COOKIE)
    assert deployment.verified(cookie) and "HttpOnly" in first.headers["set-cookie"]
    mine = TestClient(app, cookies={deployment.VISITOR_COOKIE: cookie})
    assert "set-cookie" not in mine.get("/").headers  # a valid cookie is kept
    forged = TestClient(app, cookies={deployment.VISITOR_COOKIE: cookie.split(".")[0] + ".0"})
    replaced = forged.get("/").cookies.get(deployment.VISITOR_COOKIE)
    assert replaced and deployment.verified(replaced) != deployment.verified(cookie)

    upload = public / "upload.gguf"
    upload.write_bytes(b"GGUF")
    deployment.check_upload(str(upload), request=browser(cookie, "page-1"))  # served to its uploader only
    url = f"/gradio_api/file={upload}"
    assert mine.get(url).text == "served"
    assert TestClient(app).get(url).status_code == 404 and forged.get(url).status_code == 404

    monkeypatch.setenv("FORNAX_MAX_UPLOAD_FILES", "3")
    files = [("files", (f"f{i}.txt", b"x" * 10)) for i in range(50)]
    response = mine.post("/gradio_api/upload", files=files)
    assert response.status_code == 413 and "at most 3 files" in response.text
    assert mine.post("/gradio_api/upload", files=files[:3]).text == "3 files"


def test_another_visitors_session_hash_is_not_their_cookie(public, sleeping_jobs):
    """The client names its session hash: knowing a visitor's (it is in their page's requests) must not make
    anyone that visitor: not their job, not their results."""
    cookie = deployment.mint_cookie()
    owner = browser(cookie, "page-1")
    finetune.start_job(corpus(public), **FORM, request=owner)
    job = finetune.manager().latest(deployment.job_owner(owner))
    deployment.grant(owner, "/their/result", shown="job:theirs")
    deployment.check_upload(str(public / "corpus.txt"), request=owner)
    impostor = browser(None, "page-1")  # the owner's session hash, without the cookie
    assert deployment.visitor_id(impostor) != deployment.visitor_id(owner)
    assert "no training job of yours to cancel" in refused(lambda: user_errors(finetune.cancel_job)(impostor))
    assert job not in finetune.poll(impostor)[0]
    assert "paths on the server" in refused(lambda: deployment.check_source("job:theirs", impostor))
    assert deployment.check_source("job:theirs", owner) == "/their/result"
    assert not (finetune.manager().job_dir(job) / "cancel").exists()


# --- what a visitor owns ------------------------------------------------------------------------------------------
def test_history_shows_each_visitor_its_own_rows_and_a_local_user_everything(public, monkeypatch):
    a, b = browser(deployment.mint_cookie(), "pa"), browser(deployment.mint_cookie(), "pb")
    for request, name in ((a, "/tmp/gradio/abc/mine.gguf"), (b, "theirs")):
        History(visitor=deployment.visitor_key(request)).append(
            model=name, model_fingerprint="f" * 24, backend="eager", data="prose.txt", data_fingerprint="d",
            values={"perplexity": 3.0}, settings={})
    table, chart = evaluate.history_frames("perplexity", a)
    assert list(table["model"]) == ["mine.gguf"] and "/tmp" not in " ".join(chart["series"])
    assert list(evaluate.history_frames(None, b)[0]["model"]) == ["theirs"]
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    assert sorted(evaluate.history_frames(None, b)[0]["model"]) == ["/tmp/gradio/abc/mine.gguf", "theirs"]


def test_a_history_file_from_before_visitors_is_read_and_extended(tmp_path):
    import sqlite3

    from backend.scoring import history

    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as conn:
        conn.executescript(history.SCHEMA)
        conn.execute("INSERT INTO scores (run_id, time, model, model_fingerprint, backend, data, data_fingerprint, "
                     "metric, value, settings) VALUES ('r', 1.0, 'm', 'f', 'eager', 'd', 'x', 'perplexity', 2.0, '{}')")
        conn.execute("PRAGMA user_version = 1")
    store = History(old, visitor="someone")
    assert [r.model for r in store.rows(visitor="")] == ["m"]  # rows from before are nobody's in particular
    store.append(model="n", model_fingerprint="f", backend="eager", data="d", data_fingerprint="x",
                 values={"perplexity": 1.0}, settings={})
    assert [r.model for r in store.rows(visitor="someone")] == ["n"] and len(store.rows()) == 2


def test_only_the_visitor_who_loaded_a_model_may_export_it(public, monkeypatch):
    from playground.state import current

    loader, other = browser(deployment.mint_cookie(), "p1"), browser(deployment.mint_cookie(), "p2")
    monkeypatch.setattr(current, "loaded_by", deployment.visitor_id(loader))
    monkeypatch.setattr(current, "handle", None)
    words = "uploaded or trained by another visitor"
    assert words in refused(lambda: export.export_model("fp32", progress=lambda *a, **k: None, request=other))
    with pytest.raises(gr.Error) as e:  # the loader gets past the check (to "no model is loaded": none is)
        export.export_model("fp32", progress=lambda *a, **k: None, request=loader)
    assert words not in e.value.message
    monkeypatch.setattr(current, "loaded_by", None)  # the operator's model, default, a Hub id: anyone's
    deployment.check_export(current.loaded_by, other)
    archive = public / "tiny-onnx-fp32.zip"
    archive.write_bytes(os.urandom(64))
    served = export.served_download(archive, loader)  # where Gradio serves the download from: its maker's only
    assert os.path.exists(served) and served != str(archive)
    assert deployment.may_download(served, deployment.verified(loader.headers.cookie.split("=", 1)[1]))
    assert not deployment.may_download(served, deployment.verified(other.headers.cookie.split("=", 1)[1]))
    assert not deployment.may_download(served, None)


def test_a_pretrain_form_is_no_path_oracle(public, sleeping_jobs, tmp_path):
    existing, missing = os.path.dirname(os.__file__), str(tmp_path / "no-such-folder")  # (a folder that exists)
    request = browser(deployment.mint_cookie(), "p")
    messages = {path: refused(lambda: user_errors(finetune.start_job)(corpus(tmp_path), **{**FORM, "model": path},
                                                                      request=request))
                for path in (existing, missing)}
    assert len(set(messages.values())) == 1 and "paths on the server are not available" in messages[existing]
    assert not sleeping_jobs  # nothing started


def test_a_finished_result_is_loaded_by_its_job_name_and_only_by_its_owner(public, tmp_path, monkeypatch):
    import hashlib
    import json

    from playground.state import current
    from tests.backend.tiny import make_tiny

    monkeypatch.setattr(current, "handle", current.handle)  # (the model slot is put back afterwards)
    out = public / "cache" / "finetuned" / "lora-1"
    make_tiny("llama", out)
    owner, other = browser(deployment.mint_cookie(), "p1"), browser(deployment.mint_cookie(), "p2")
    job_dir = finetune.manager().root / "20260101-000000-abcd"
    job_dir.mkdir(parents=True)
    (job_dir / "owner").write_text(hashlib.sha256(deployment.job_owner(owner).encode()).hexdigest())
    (job_dir / "state.json").write_text(json.dumps(dict(
        id=job_dir.name, status="done", step=10, total_steps=10, out_dir=str(out), config={"mode": "lora"},
        started=1.0, updated=2.0, message=f"done; saved to {out}", samples=[], train_loss=[], val_loss=[])))
    status, _, _, result = finetune.poll(owner)
    assert result == f"job:{job_dir.name}" and str(out) not in status and "/tmp" not in status
    assert finetune.result_folder(result, owner) == result
    no_progress = lambda *a, **k: None  # noqa: E731
    card = model.load_model(result, progress=no_progress, request=owner)[0]
    assert result in card and str(public) not in card and current.loaded_by == deployment.visitor_id(owner)
    assert "paths on the server" in refused(lambda: model.load_model(result, progress=no_progress, request=other))
    assert "another visitor" in refused(lambda: export.export_model("fp32", progress=no_progress, request=other))


@pytest.mark.parametrize("swap", ["nobody", "anyone"])
def test_the_operator_decides_who_may_swap_the_model(tmp_path, monkeypatch, swap):
    from playground.state import current

    monkeypatch.setenv("FORNAX_MODEL_SWAP", swap)
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    gguf = bf.tiny_gguf(tmp_path / "tiny.gguf")
    before = current.handle
    request = browser(deployment.mint_cookie(), "p")
    if swap == "nobody":
        for call in (lambda: model.load_model(str(gguf), progress=lambda *a, **k: None, request=request),
                     lambda: model.load_upload(str(gguf), progress=lambda *a, **k: None, request=request)):
            assert "FORNAX_MODEL_SWAP=nobody" in refused(call)
        assert current.handle is before
    else:
        card = model.load_upload(str(gguf), progress=lambda *a, **k: None, request=request)[0]
        assert "tiny.gguf" in card and current.loaded_by == deployment.visitor_id(request)


def test_errors_reach_a_public_page_without_paths(public, monkeypatch):
    secret_path = f"{tempfile.gettempdir()}/gradio/0123abcd/upload.gguf"

    @user_errors
    def unexpected():
        raise OSError(f"[Errno 13] Permission denied: '{secret_path}'")

    @user_errors
    def plain():
        raise ModelLoadError(f"cannot read {secret_path}: not a GGUF file")

    assert refused(unexpected) == "something went wrong on the server; the app is still running, try again"
    assert refused(plain) == "cannot read upload.gguf: not a GGUF file"
    monkeypatch.setenv("FORNAX_PUBLIC", "0")  # a local user sees the whole message
    assert secret_path in refused(plain)


def test_per_visitor_tables_stay_bounded(public):
    for i in range(deployment.MAX_VISITORS_KEPT + 500):
        deployment.grant(gr.Request(session_hash=f"visitor-{i}"), f"/folder/{i}")
    assert len(deployment._granted) == deployment.MAX_VISITORS_KEPT
    one = gr.Request(session_hash="greedy")
    for i in range(500):
        deployment.grant(one, f"/folder/{i}", shown=f"job:{i}")
    assert len(deployment._granted[deployment.visitor_id(one)]) == deployment.MAX_GRANTS_PER_VISITOR
    assert deployment.check_source("job:499", one) == "/folder/499"  # the newest are kept


# --- every value a public page gets -------------------------------------------------------------------------------
PATHISH = re.compile(r"(?<![\w:/])/(?:tmp|root|home|work|var|etc|usr)/")


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def test_no_public_response_carries_a_server_path(public, sleeping_jobs, monkeypatch):
    from playground import build_app, current
    from tests.playground.serve import serving

    gguf = bf.tiny_gguf(public / "tiny.gguf")
    broken = public / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(200))
    with serving(build_app()) as url:
        client = gradio_client.Client(url, verbose=False)
        shown = {"load_upload": client.predict(file=gradio_client.handle_file(str(gguf)), dtype="auto",
                                               api_name="/load_upload"),
                 "evaluate": client.predict(upload=None, sample="prose (perplexity, agreement)",
                                            metrics=["perplexity"], runner_name="", against="", max_length=32,
                                            stride=16, max_new_tokens=4, temperature=0, api_name="/evaluate"),
                 "history": client.predict(metric="perplexity", api_name="/evaluation_history"),
                 "finetune": client.predict(upload=gradio_client.handle_file(corpus(public)),
                                            **FORM, api_name="/finetune")}
        for name, call in (("broken upload", lambda: client.predict(file=gradio_client.handle_file(str(broken)),
                                                                    dtype="auto", api_name="/load_upload")),
                           ("export of another's", lambda: gradio_client.Client(url, verbose=False).predict(
                               precision="fp32", api_name="/export"))):
            with pytest.raises(AppError) as e:
                call()
            shown[name] = str(e.value)
        assert "tiny.gguf" in shown["load_upload"][0] and "tiny.gguf" in str(shown["history"])
        assert current.info()["source"].startswith(tempfile.gettempdir())  # (the path exists, on the server)
    for name, value in shown.items():
        leaks = [s for s in strings(value) if PATHISH.search(s) or str(public) in s]
        assert not leaks, (name, leaks)


# --- review: Gradio's other file route, the boundary's spelling, upload bytes per hour, racing tables ------------
def toy_app():
    """A Starlette app behind VisitorCookies that serves anything (as Gradio's file routes do) and counts the files
    of an upload."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def anything(request):
        if request.url.path.endswith("/upload"):
            form = await request.form()
            return PlainTextResponse(f"{len(form.getlist('files'))} files")
        return PlainTextResponse("served")

    app = Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST"])])
    app.add_middleware(deployment.VisitorCookies)
    return app


def test_every_file_route_serves_an_owned_file_to_its_owner_only(public):
    from urllib.parse import quote

    from starlette.testclient import TestClient

    app, cookie = toy_app(), deployment.mint_cookie()
    mine, stranger = TestClient(app, cookies={deployment.VISITOR_COOKIE: cookie}), TestClient(app)
    upload = public / "gradio" / "0123abcd" / "d.csv"
    upload.parent.mkdir(parents=True)
    upload.write_text("text\nhello\n")
    deployment.check_upload(str(upload), request=browser(cookie, "page-1"))
    name = str(upload)
    detour = f"{upload.parent}/../{upload.parent.name}/d.csv"
    for url in (f"/gradio_api/file={name}", f"/gradio_api/file/{name}", f"/gradio_api/file//{name}",
                f"/gradio_api/file={name.replace('/', '//')}", f"/gradio_api/file={detour}", f"/file={name}",
                f"/file/{name}", f"/gradio_api/file%3D{quote(name)}", f"/gradio_api/file/{quote(quote(name))}"):
        assert stranger.get(url).status_code == 404, url
        assert mine.get(url).text == "served", url
    assert stranger.get("/gradio_api/file=/elsewhere/nobody-owns.csv").text == "served"  # Gradio's own rules


def multipart(n: int, boundary: bytes = b"XyZbound", size: int = 8) -> bytes:
    parts = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="f%d.txt"\r\n'
                     b"Content-Type: text/plain\r\n\r\n" % i + b"x" * size + b"\r\n" for i in range(n))
    return parts + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=XyZbound",
                                          "multipart/form-data; Boundary=XyZbound",
                                          "multipart/form-data; BOUNDARY=XyZbound",
                                          "multipart/form-data; boundary = XyZbound",
                                          'Multipart/Form-Data; boundary="XyZbound"'])
def test_the_file_cap_holds_however_the_boundary_is_spelled(public, monkeypatch, content_type):
    from starlette.testclient import TestClient

    monkeypatch.setenv("FORNAX_MAX_UPLOAD_FILES", "4")
    client = TestClient(toy_app())
    response = client.post("/gradio_api/upload", content=multipart(10), headers={"content-type": content_type})
    assert response.status_code == 413 and "at most 4 files" in response.text
    assert client.post("/gradio_api/upload", content=multipart(4), headers={"content-type": content_type}).text \
        == "4 files"


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=",
                                          "multipart/form-data; boundry=XyZbound", "text/plain", ""])
def test_an_upload_without_a_boundary_is_refused(public, content_type):
    from starlette.testclient import TestClient

    response = TestClient(toy_app()).post("/gradio_api/upload", content=multipart(10),
                                          headers={"content-type": content_type})
    assert response.status_code == 400 and "boundary" in response.text


def test_an_address_may_upload_only_so_many_bytes_per_hour(public, monkeypatch):
    from starlette.testclient import TestClient

    monkeypatch.setattr(deployment, "_upload_budgets", deployment.Bounded(deployment.MAX_VISITORS_KEPT))
    monkeypatch.setenv("FORNAX_MAX_UPLOAD_BYTES_PER_HOUR", "5000")
    client, headers = TestClient(toy_app()), {"content-type": "multipart/form-data; boundary=XyZbound"}
    body = multipart(1, size=2000)  # ~2,130 bytes with its form: two fit in 5,000, a third does not
    assert client.post("/gradio_api/upload", content=body, headers=headers).text == "1 files"
    assert client.post("/gradio_api/upload", content=body, headers=headers).text == "1 files"
    refused_declared = client.post("/gradio_api/upload", content=body, headers=headers)  # over what is left
    assert refused_declared.status_code == 429 and "5,000 bytes per hour" in refused_declared.text

    def chunked():  # no Content-Length: counted as the bytes arrive
        yield body[:700]
        yield body[700:]

    assert client.post("/gradio_api/upload", content=chunked(), headers=headers).status_code == 429
    assert client.get("/").text == "served"  # everything else still is
    monkeypatch.setenv("FORNAX_MAX_UPLOAD_BYTES_PER_HOUR", "0")  # none (a private deployment's default)
    assert client.post("/gradio_api/upload", content=body, headers=headers).text == "1 files"


def test_an_hourly_upload_allowance_refills_over_the_hour(monkeypatch):
    monkeypatch.setattr(deployment, "_upload_budgets", deployment.Bounded(8))
    assert deployment.spend_upload("a", 3600, 3600) == 0
    level, then = deployment._upload_budgets["a"]
    assert deployment.upload_allowance("a", 3600, then + 600) == pytest.approx(600)
    assert deployment.upload_allowance("a", 3600, then + 10 * 3600) == 3600  # never more than one hour's worth
    assert deployment.upload_allowance("b", 3600) == 3600


@pytest.mark.parametrize("table", ["files", "grants"])
def test_per_visitor_tables_lose_no_concurrent_update(public, table):
    import threading
    import time

    bounded = deployment._file_owners if table == "files" else deployment._granted
    get = bounded.get

    def slow_get(*args):  # a thread switch between reading a visitor's entry and writing it back
        value = get(*args)
        time.sleep(0.05)
        return value

    bounded.get = slow_get  # (on this table only; removed below)
    path = str(public / "shared.csv")
    one = browser(deployment.mint_cookie(), "p1")
    visitors = [one] * 4 if table == "grants" else [browser(deployment.mint_cookie(), f"p{i}") for i in range(4)]

    def act(i, request):
        if table == "files":
            deployment.own_file(request, path)
        else:
            deployment.grant(request, f"/folder/{i}", shown=f"job:{i}")

    threads = [threading.Thread(target=act, args=(i, r)) for i, r in enumerate(visitors)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del bounded.get
    if table == "files":
        for request in visitors:
            raw = deployment.verified(request.headers.cookie.split("=", 1)[1])
            assert deployment.may_download(path, raw)
    else:
        assert all(deployment.check_source(f"job:{i}", one) == f"/folder/{i}" for i in range(4))
