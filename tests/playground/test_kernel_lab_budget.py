"""The Kernel lab bounds what a check works on, not only its inputs (issue 18, Medium): attention's reference
materialises B×H×T×T scores and the linear cross-entropy's N×V logits, quadratic in sizes each within the
per-dimension cap. Such a shape is refused in plain words before any subprocess or tensor exists."""
import gradio as gr
import pytest

from playground.tabs import kernel_lab
from tests.backend.bad_files import peak_rss_bytes, peak_rss_reset, rss_bytes


@pytest.fixture
def no_subprocess(monkeypatch):
    started = []
    monkeypatch.setattr(kernel_lab.subprocess, "run", lambda *a, **k: started.append(a) or pytest.fail("started"))
    monkeypatch.setattr(kernel_lab, "on_gpu", lambda: False)
    return started


@pytest.mark.parametrize("op, shape, what", [
    ("attention", "1, 1, 1, 20000, 1", "B×H×T×T attention scores"),        # 60,000 inputs -> 4e8 scores
    ("linear_cross_entropy", "30000, 1, 30000", "N×V logits"),              # 60,001 inputs -> 9e8 logits
])
def test_a_quadratic_intermediate_past_the_cap_is_refused_before_starting(no_subprocess, monkeypatch, op, shape,
                                                                         what):
    monkeypatch.setenv("FORNAX_KERNEL_LAB_CPU_ELEMENTS", "100000")         # every size and the inputs within it
    peak_rss_reset()
    before = rss_bytes()
    with pytest.raises(gr.Error, match=f"works on .* elements \\(its {what}\\); the cap here is 100,000"):
        kernel_lab.run_check(op, shape, "float32")
    assert peak_rss_bytes() - before < 200 * 1024**2 and no_subprocess == []


def test_public_mode_refuses_the_t_squared_attention_of_a_small_input(no_subprocess, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")                                 # 40,000 elements per check
    with pytest.raises(gr.Error, match="169,000,000 elements"):
        kernel_lab.run_check("attention", "1, 1, 1, 13000, 1", "float32")   # 39,000 inputs -> 1.7e8 scores


def test_the_memory_budget_bounds_what_the_cap_lets_through(no_subprocess, monkeypatch):
    monkeypatch.setenv("FORNAX_KERNEL_LAB_CPU_ELEMENTS", str(10**9))
    monkeypatch.setenv("FORNAX_MEMORY_BUDGET_BYTES", str(1024**3))
    with pytest.raises(gr.Error, match="checking attention at .* would need about .* GiB of memory"):
        kernel_lab.run_check("attention", "1, 4, 4, 8192, 8", "float32")


def test_the_presets_stay_within_the_public_caps(monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    cap = kernel_lab.element_cap()
    for op, (_, shapes) in kernel_lab.OPS.items():
        for shape in shapes:
            kernel_lab.check_work(op, kernel_lab.parse_shape(shape), cap)   # raises if refused


def test_after_a_refusal_a_check_still_runs(monkeypatch):
    monkeypatch.setattr(kernel_lab, "on_gpu", lambda: False)
    with pytest.raises(gr.Error):
        kernel_lab.run_check("attention", "1, 1, 1, 40000, 1", "float32")
    summary, table, _ = kernel_lab.run_check("attention", "1, 2, 1, 16, 32", "float32")
    assert "agrees" in summary and len(table) == 4
