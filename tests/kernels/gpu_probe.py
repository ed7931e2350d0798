"""GPU probes for kernels/gpu_run.sh: what the kernel tests do not reach, on a real CUDA device.

    python3 tests/kernels/gpu_probe.py OUT.json [--budget-s 120] [--only autocast,grid_limits] [--cuda 0|1]

Each probe runs in a child process of its own, under its own timeout: a launch past a limit, an illegal address
(which poisons the CUDA context for the rest of a process) or a hang costs that probe only. Each writes one JSON
record {name, status: ok | fail | timeout | crash | skipped, seconds, why, ...measurements}; the parent gathers
them into OUT.json and prints one line per probe. Without CUDA every probe is recorded as skipped, saying why.
Probes: autocast (Linear CE and a training step with fp32 weights under bf16 autocast), cuda_graph (decode
attention + RMSNorm captured and replayed), gpu_tiles (attention / decode / Linear CE at GPU sizes), shared_memory
(fp32 and bf16 at head dims 128 and 256: the configs nearest Hopper's 227 KB), int32_offsets (more than 2^31
elements), grid_limits (past 65,535 on what was grid axis 1), end_to_end (teacher-forced eager vs triton vs
compiled+triton under inference_mode, bf16 and fp32, and the fp32 CUDA-graph logits kept across steps).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def expect(name: str, err: float, tol: float, record: dict) -> None:
    record[name] = round(err, 6)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def probe_autocast(r: dict) -> None:
    """--kernels triton full finetuning: fp32 weights, bf16 autocast; the loss and gradients against eager."""
    import torch
    import torch.nn.functional as F

    import kernels
    from backend import ModelConfig, Transformer
    from backend.training.fused import TritonLoss

    torch.manual_seed(0)
    h = torch.randn(4, 256, 576, device="cuda")
    w = 0.02 * torch.randn(49152, 576, device="cuda")
    t = torch.randint(0, 49152, (4, 256), device="cuda")
    h1, w1, h2, w2 = (x.clone().requires_grad_() for x in (h, w, h, w))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(h1, w1, t)
        ref = F.cross_entropy(F.linear(h2, w2).float().flatten(0, 1), t.flatten())
    loss.backward()
    ref.backward()
    expect("lce_loss", rel_err(loss, ref), 1e-2, r)
    expect("lce_dhidden", rel_err(h1.grad, h2.grad), 3e-2, r)
    expect("lce_dweight", rel_err(w1.grad, w2.grad), 3e-2, r)
    model = Transformer(dataclasses.replace(ModelConfig.from_name("smollm2-135m"), n_layer=2)).to("cuda")
    model.reset_buffers("cuda")
    patched = kernels.patch(model)
    x = torch.randint(0, model.config.vocab_size, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = F.cross_entropy(model(x).float().flatten(0, 1), x.flatten(), reduction="sum")
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    r["eager_grad_max"] = max(float(g.abs().max()) for g in eager_grads)
    assert r["eager_grad_max"] > 0, "eager gradients are all zero: the comparison below would mean nothing"
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = TritonLoss(patched, torch.device("cuda")).loss_sum(patched, x, x)
    fused.backward()
    expect("step_loss", rel_err(fused, eager), 1e-2, r)
    expect("step_grads", max(rel_err(p.grad, g) for p, g in zip(model.parameters(), eager_grads)), 5e-2, r)


def probe_cuda_graph(r: dict) -> None:
    """Decode attention and RMSNorm captured in one CUDA graph and replayed over new inputs equal eager."""
    import torch

    import kernels

    B, H, Hk, S, D = 4, 8, 2, 4096, 128
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hk, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    length = torch.tensor(1000, device="cuda")
    w = torch.randn(H * D, device="cuda", dtype=torch.bfloat16)

    def step():
        return kernels.rms_norm(kernels.decode_attention(q, k, v, length).reshape(B, H * D), w, 1e-5)

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()                                          # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for n in (17, 1000, 4096):
            q.normal_()
            length.fill_(n)
            graph.replay()
            torch.cuda.synchronize()
            expect(f"replay_len_{n}", rel_err(out, step()), 1e-2, r)


def probe_gpu_tiles(r: dict) -> None:
    """GPU-size shapes: attention fwd+bwd at T=2048, decode over 32k slots, Linear CE's peak memory at 49k vocab."""
    import torch
    import torch.nn.functional as F

    import kernels

    q = torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 4, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    o = kernels.attention(q, k, v)
    o.backward(torch.ones_like(o))
    got = [o.detach(), q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(torch.ones_like(ref))
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, [ref, q.grad, k.grad, v.grad]):
        expect(f"attention_{name}", rel_err(a, b), 3e-2, r)
    with torch.inference_mode():
        qd = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        kc, vc = (torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = kernels.decode_attention(qd, kc, vc, 30000)
        ref = F.scaled_dot_product_attention(qd, kc[:, :, :30000], vc[:, :, :30000], enable_gqa=True)
        expect("decode_32k", rel_err(out, ref), 2e-2, r)


def probe_shared_memory(r: dict) -> None:
    """fp32 and bf16 at head dims 128 and 256, forward + backward and decode: the builds nearest 227 KB launch."""
    import torch
    import torch.nn.functional as F

    import kernels

    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
        for D in (128, 256):
            name = f"{str(dtype)[6:]}_D{D}"
            q = torch.randn(1, 4, 300, D, device="cuda", dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, 2, 300, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
            o = kernels.attention(q, k, v)
            o.sum().backward()
            ref_q, ref_k, ref_v = (x.detach().float().requires_grad_() for x in (q, k, v))
            ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, is_causal=True, enable_gqa=True)
            ref.sum().backward()
            expect(f"attention_{name}", rel_err(o, ref), tol, r)
            expect(f"attention_dq_{name}", rel_err(q.grad, ref_q.grad), 3 * tol, r)
            with torch.inference_mode():
                kc, vc = (torch.randn(2, 2, 2048, D, device="cuda", dtype=dtype) for _ in range(2))
                qd = torch.randn(2, 4, 1, D, device="cuda", dtype=dtype)
                out = kernels.decode_attention(qd, kc, vc, 1500)
                ref = F.scaled_dot_product_attention(qd.float(), kc[:, :, :1500].float(), vc[:, :, :1500].float(),
                                                     enable_gqa=True)
                expect(f"decode_{name}", rel_err(out, ref), tol, r)


def probe_int32_offsets(r: dict) -> None:
    """Past 2^31 elements: row offsets must be computed in int64 (rms_norm, swiglu, cross-entropy)."""
    import torch
    import torch.nn.functional as F

    import kernels

    with torch.inference_mode():
        x = torch.randn(2**31 // 4096 + 64, 4096, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
        y = kernels.rms_norm(x, w, 1e-5)
        tail = x[-64:].float()
        expect("rms_norm_tail", rel_err(y[-64:], tail * torch.rsqrt(tail.pow(2).mean(-1, keepdim=True) + 1e-5)),
               2e-2, r)
        del x, y
        g, u = (torch.randn(2**31 // 8192 + 8, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        s = kernels.swiglu(g, u)
        expect("swiglu_tail", rel_err(s[-8:], F.silu(g[-8:].float()) * u[-8:].float()), 2e-2, r)
        del g, u, s
        logits = torch.randn(2**31 // 32768 + 16, 32768, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, 32768, (logits.shape[0],), device="cuda")
        loss = kernels.cross_entropy(logits, t)
        expect("cross_entropy", rel_err(loss, F.cross_entropy(logits.float(), t)), 1e-2, r)


def probe_grid_limits(r: dict) -> None:
    """Rotary past 65,535 positions and attention with batch x heads past 65,535 (once grid axis 1)."""
    import torch
    import torch.nn.functional as F

    import kernels

    T = 70_000
    q, k = (torch.randn(1, 1, T, 16, device="cuda") for _ in range(2))
    cos, sin = torch.randn(T, 16, device="cuda"), torch.randn(T, 16, device="cuda")
    qo, _ = kernels.rotary(q, k, cos, sin)
    expect("rotary_70k_positions", rel_err(qo, q * cos + torch.cat([-q[..., 8:], q[..., :8]], -1) * sin), 1e-5, r)
    q, k, v = (torch.randn(70_000, 1, 16, 16, device="cuda", requires_grad=True) for _ in range(3))
    o = kernels.attention(q, k, v)
    o.sum().backward()
    ref_q = q.detach().clone().requires_grad_()
    ref = F.scaled_dot_product_attention(ref_q, k.detach(), v.detach(), is_causal=True)
    ref.sum().backward()
    expect("attention_70k_batch_heads", rel_err(o, ref), 1e-3, r)
    expect("attention_70k_dq", rel_err(q.grad, ref_q.grad), 1e-3, r)


def probe_end_to_end(r: dict) -> None:
    """Teacher-forced: the same 64 prompt tokens and 32 forced next tokens through eager, triton and
    compiled+triton (inductor, CUDA-graph decode) under inference_mode; the largest logit gap per runner, and
    (fp32) that a decode step's logits survive the next step."""
    import torch

    from backend import ModelConfig, Transformer
    from backend.runners import PREPARABLE
    from backend.runners.eager import EagerRunner

    config = dataclasses.replace(ModelConfig.from_name("smollm2-135m"), n_layer=2)
    for dtype, tol in ((torch.float32, 2e-2), (torch.bfloat16, 0.15)):   # fp32 first: the aliasing case
        torch.manual_seed(0)
        model = Transformer(config).to("cuda", dtype).eval()
        model.reset_buffers("cuda")
        ids = torch.randint(0, config.vocab_size, (1, 96), device="cuda")
        runs = {}
        for name in ("eager", "triton", "compiled+triton"):
            runner = EagerRunner(model) if name == "eager" else PREPARABLE[name](model, None)
            with torch.inference_mode():
                runner.start(1, 128)
                steps = [runner.forward(ids[:, :64], 0)]
                for pos in range(64, 96):
                    steps.append(runner.forward(ids[:, pos:pos + 1], pos))
                    if pos == 64:
                        first_step = steps[1].clone()           # later replays reuse a CUDA graph's memory
                r[f"{name}_{str(dtype)[6:]}_logits_kept"] = bool(torch.equal(first_step, steps[1]))
            runs[name] = torch.stack(steps)
            runner.free()
        for name in ("triton", "compiled+triton"):
            expect(f"{name}_{str(dtype)[6:]}_vs_eager", rel_err(runs[name], runs["eager"]), tol, r)
        assert all(v for key, v in r.items() if key.endswith("logits_kept")), "logits changed by a later step"


def probe_sanitizer_kernels(r: dict) -> None:
    """Small shapes of every kernel, forward and backward, for compute-sanitizer memcheck (gpu_run.sh runs this
    child under it): masked tails on every edge (odd rows, odd lengths, head dims below the tile)."""
    import torch

    import kernels

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    x, w, res = leaf(37, 200), leaf(200), leaf(37, 200)
    kernels.add_rms_norm(x, res, w, 1e-5)[0].sum().backward()
    kernels.layer_norm(x, w, leaf(200), 1e-5).sum().backward()
    kernels.swiglu(x, res).sum().backward()
    kernels.gelu_tanh(x).sum().backward()
    q, k, v = leaf(2, 4, 45, 40), leaf(2, 2, 45, 40), leaf(2, 2, 45, 40)
    cos, sin = torch.randn(45, 40, device="cuda"), torch.randn(45, 40, device="cuda")
    qr, kr = kernels.rotary(q, k, cos, sin)
    kernels.attention(qr, kr, v).sum().backward()
    with torch.no_grad():
        kernels.decode_attention(q[:, :, :1], k.detach(), v.detach(), torch.tensor([3, 45], device="cuda"))
    logits, t = leaf(37, 1003), torch.randint(0, 1003, (37,), device="cuda")
    kernels.cross_entropy(logits, t).backward()
    kernels.linear_cross_entropy(x, leaf(1003, 200), t).backward()
    torch.cuda.synchronize()
    r["kernels"] = "rms_norm layer_norm swiglu gelu rotary attention decode cross_entropy linear_cross_entropy"


PROBES = {"autocast": (probe_autocast, 60), "cuda_graph": (probe_cuda_graph, 45), "gpu_tiles": (probe_gpu_tiles, 45),
          "shared_memory": (probe_shared_memory, 60), "int32_offsets": (probe_int32_offsets, 45),
          "grid_limits": (probe_grid_limits, 45), "end_to_end": (probe_end_to_end, 140)}


def child(name: str) -> int:
    """Run one probe here (or `sanitizer_kernels`, which only gpu_run.sh runs); its record is the last stdout line."""
    record = {"name": name, "status": "ok"}
    t = time.perf_counter()
    try:
        (probe_sanitizer_kernels if name == "sanitizer_kernels" else PROBES[name][0])(record)
    except Exception as e:  # noqa: BLE001  (reported, not raised: the parent gathers every probe)
        record.update(status="fail", why=f"{type(e).__name__}: {str(e)[:600]}")
    record["seconds"] = round(time.perf_counter() - t, 2)
    print(json.dumps(record), flush=True)
    return 0 if record["status"] == "ok" else 1


def run_one(name: str, timeout_s: float) -> dict:
    t = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                              timeout=timeout_s, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "why": f"killed after {timeout_s:.0f} s",
                "seconds": round(time.perf_counter() - t, 2)}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"name": name, "status": "crash", "why": f"exit {done.returncode}: {done.stderr.strip()[-800:]}",
                "seconds": round(time.perf_counter() - t, 2)}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child(argv[1])
    out = Path(argv[0])
    budget = float(argv[argv.index("--budget-s") + 1]) if "--budget-s" in argv else 300.0
    names = argv[argv.index("--only") + 1].split(",") if "--only" in argv else list(PROBES)
    if "--cuda" in argv:  # the caller knows (gpu_run.sh): a dry run needs no torch import
        cuda = argv[argv.index("--cuda") + 1] == "1"
    else:
        import torch

        cuda = torch.cuda.is_available()
    deadline = time.monotonic() + budget
    records = []
    for name in names:
        left = deadline - time.monotonic()
        if not cuda:
            record = {"name": name, "status": "skipped", "why": "no CUDA device, or a dry run (gpu_run.sh)"}
        elif left < 10:
            record = {"name": name, "status": "skipped", "why": f"probe budget of {budget:.0f} s spent"}
        else:
            record = run_one(name, min(PROBES[name][1], left))
        records.append(record)
        print(f"probe {name:14s} {record['status']:8s} {record.get('seconds', 0):6.1f} s  {record.get('why', '')}",
              flush=True)
        out.write_text(json.dumps(records, indent=1))   # every record so far, should this process be killed
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
