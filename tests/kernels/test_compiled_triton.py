"""compiled+triton: torch.compile over the model patched with our kernels traces whole (fullgraph), with the
kernels' `fornax::` ops in the graphs it compiles, and gives eager's logits for prefill and every decode step
without recompiling. In the interpreter the graphs run through aot_eager (inductor works too, but takes a minute
to compile here); on a GPU the registry's runner: inductor, and a CUDA graph for decode (kernels/gpu_check.sh)."""
import torch

from backend import ModelConfig, Transformer
from backend.runners import PREPARABLE, offered
from backend.runners.eager import EagerRunner
from backend.runners.triton import CompiledTritonRunner


def test_compiled_triton_traces_and_equals_eager_on_tiny_llama(device):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama")).to(device).eval()
    model.reset_buffers(device)
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return lookup_backend("aot_eager")(gm, example_inputs)

    if device == "cpu":
        compiled = CompiledTritonRunner(model, compiler=recording_aot_eager)
    else:  # the registry's runner, as a handle prepares it: inductor, decode as a CUDA graph
        compiled = PREPARABLE["compiled+triton"](model, None)
    eager = EagerRunner(model)
    assert compiled.name == "compiled+triton"
    assert all(p is q for p, q in zip(model.parameters(), compiled.model.parameters()))   # weights shared
    ids = torch.randint(0, model.config.vocab_size, (2, 11), device=device)
    tol = dict(atol=1e-4, rtol=1e-4) if device == "cpu" else dict(atol=2e-3, rtol=2e-3)   # inductor reorders sums
    with torch.no_grad():
        compiled.start(2, 24)
        eager.start(2, 24)
        ref = eager.forward(ids, 0)
        torch.testing.assert_close(compiled.forward(ids, 0), ref, **tol)   # prefill, bucket of 16
        for pos in range(11, 14):                                                    # decode steps
            token = ref.argmax(-1, keepdim=True)
            ref = eager.forward(token, pos)
            torch.testing.assert_close(compiled.forward(token, pos), ref, **tol)
    assert compiled.compiles == 2                      # one prefill graph, one decode graph: no recompiles
    if device == "cpu":
        prefill, decode = graphs
        kernels_ops = {"fornax.rms_norm_fwd", "fornax.rotary", "fornax.swiglu_fwd"}
        assert kernels_ops <= prefill                  # prefill over the cache keeps PyTorch's masked attention
        assert kernels_ops | {"fornax.decode_attention"} <= decode
    compiled.free()


def test_compiled_triton_is_offered_only_with_cuda(monkeypatch):
    assert "compiled+triton" in PREPARABLE
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not offered("compiled+triton") and offered("compiled")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert offered("compiled+triton")

