"""The Triton runner: our tiny Llama and GPT-2 with every `self.ops` op on Triton give eager's logits."""
import pytest
import torch

import kernels
from backend import GenerationError, ModelConfig, Transformer
from backend.runners import PREPARABLE
from backend.runners.eager import EagerRunner


def tiny(preset: str, device: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset)).to(device).eval()
    model.reset_buffers(device)
    return model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_triton_runner_matches_eager_full_forward_and_cached_decode(preset, device):
    model = tiny(preset, device)
    eager = EagerRunner(model)
    triton = PREPARABLE["triton"](model, None)                        # the registry's factory, as a handle calls it
    assert triton.name == "triton"
    patched = triton.model
    assert patched is not model
    assert all(p is q for p, q in zip(model.parameters(), patched.parameters()))           # weights shared
    ops_modules = [m for m in patched.modules() if hasattr(m, "ops")]
    assert ops_modules and all(m.ops is kernels.OPS for m in ops_modules)
    assert all(m.ops is not kernels.OPS for m in model.modules() if hasattr(m, "ops"))     # the original untouched

    ids = torch.randint(0, model.config.vocab_size, (2, 13), device=device)
    with torch.no_grad():
        torch.testing.assert_close(triton.full_logits(ids), eager.full_logits(ids), atol=1e-4, rtol=1e-4)
        eager.start(2, 24)
        triton.start(2, 24)
        ref = eager.forward(ids, 0)                                   # prefill (masked attention: eager in both)
        torch.testing.assert_close(triton.forward(ids, 0), ref, atol=1e-4, rtol=1e-4)
        pos = ids.shape[1]
        for _ in range(3):                                            # decode steps: Triton decode attention
            token = ref.argmax(-1, keepdim=True)                      # (B, 1)
            ref = eager.forward(token, pos)
            torch.testing.assert_close(triton.forward(token, pos), ref, atol=1e-4, rtol=1e-4)
            pos += 1
    eager.free()
    triton.free()


def test_triton_runner_without_cuda_or_interpreter_says_so(monkeypatch):
    import backend.runners.triton as triton_runner

    monkeypatch.setattr(triton_runner, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GenerationError, match="the Triton backend needs a CUDA GPU"):
        triton_runner.TritonRunner(tiny("tiny-llama", "cpu"))
