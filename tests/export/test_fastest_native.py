"""The fastest faithful path puts the native CPU path first for a model from a GGUF file: chosen when its held-out
KL against eager is within the bound (the KL checked here against one computed from the two runners' logits), and
passed over, with its KL said, when it is not."""

import pytest
import torch

import native
from export.fastest import fastest_faithful
from export.verify import HELDOUT_TOKENS, heldout_text
from tests.backend.test_native_runner import synthetic_handle

pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    return synthetic_handle(tmp_path_factory, "synthetic-fastest", 5, n_layer=2, d_model=64, d_ff=128, n_head=2,
                            n_kv_head=1, head_dim=32)


def test_native_is_chosen_within_the_bound_and_passed_over_beyond_it(handle):
    ids = torch.tensor([handle.tokenizer.encode(heldout_text(), add_special_tokens=False)[:HELDOUT_TOKENS + 1]])
    with torch.inference_mode():
        p = torch.log_softmax(handle.model(ids)[0, :-1].double(), -1)
        q = torch.log_softmax(handle.runner("native").full_logits(ids)[0, :-1].double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl > 0
    found = fastest_faithful(handle, max_kl=kl * 1.01, quants=("native",))
    assert found.quant == "native" and found.name == "native"
    assert found.kl == pytest.approx(kl, rel=1e-3)
    beyond = fastest_faithful(handle, max_kl=kl / 2, quants=("native",))
    assert beyond.quant is None and beyond.rejected["native"] == pytest.approx(kl, rel=1e-3)
    assert "native KL" in beyond.why_not()
