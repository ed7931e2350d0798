"""A model another visitor uploaded or trained stays theirs in public mode: a finetune of "the loaded model" by
someone else (whose result that someone could then load and export) is refused; its owner may finetune it."""
from playground import deployment
from playground.errors import user_errors
from playground.tabs import finetune
from tests.playground.test_visitors import FORM, browser, corpus, public, refused, sleeping_jobs  # noqa: F401


def test_only_the_visitor_who_loaded_a_model_may_finetune_it(public, sleeping_jobs, tmp_path, monkeypatch):  # noqa: F811
    from playground.state import current

    loader, other = browser(deployment.mint_cookie(), "p1"), browser(deployment.mint_cookie(), "p2")
    monkeypatch.setattr(current, "loaded_by", deployment.visitor_id(loader))
    monkeypatch.setattr(current, "info", lambda: {"source": str(tmp_path / "someone-elses.gguf")})
    form = {**FORM, "mode": "lora", "model": ""}  # an empty Model box: the model loaded now
    words = "uploaded or trained by another visitor: only they can finetune it"
    assert words in refused(lambda: user_errors(finetune.start_job)(corpus(tmp_path), **form, request=other))
    assert not sleeping_jobs  # nothing started
    user_errors(finetune.start_job)(corpus(tmp_path), **form, request=loader)  # its owner may
    assert len(sleeping_jobs) == 1
