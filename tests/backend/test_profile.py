"""The decode-step profile (backend/bench/profile.py) on a tiny Q4_1 model's int4 export: every MatMulNBits of the
graph is seen in every counted step, the Q4_1 side products are told apart from the 4-bit kernel, and the parts
add up to the step's wall time."""
import dataclasses
from collections import Counter

import onnx
import pytest

from backend.bench.profile import PARTS, profile_decode
from backend.bench.synthetic import scale_config, write_synthetic_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    from export import export

    root = tmp_path_factory.mktemp("profile")
    cfg = dataclasses.replace(scale_config("360m"), n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2,
                              head_dim=16, name="synthetic-small", max_seq_len=256)
    write_synthetic_gguf(cfg, root / "small.Q4_1.gguf")
    info = export(str(root / "small.Q4_1.gguf"), root / "int4", quant="int4", verify=False, float_layers=0)
    assert info["quant_method"].startswith("GGUF blocks")
    return root / "int4", cfg


def test_the_split_sees_every_4bit_matmul_and_adds_up(int4_export, monkeypatch):
    import backend.bench.profile as profile

    folder, cfg = int4_export
    ops = Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)
    # per layer the fused q/k/v, the output projection, the fused gate/up and down; then the tied output layer
    assert ops["MatMulNBits"] == 4 * cfg.n_layer + 1

    seen = {}
    real_split = profile.split

    def counting(trace, walls, skip_runs):
        runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])[skip_runs:]
        windows = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
        kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                   and e["args"].get("op_name") == "MatMulNBits"]
        seen["per_step"] = {sum(a <= e["ts"] <= b for e in kernels) for a, b in windows}
        return real_split(trace, walls, skip_runs)

    monkeypatch.setattr(profile, "split", counting)
    result = profile_decode(folder, prompt_tokens=16, new_tokens=8, threads=1)
    assert seen["per_step"] == {ops["MatMulNBits"]}  # each counted step ran each 4-bit matmul once
    assert result["steps"] == 8 - profile.SKIP_STEPS
    assert result["4-bit matmuls"] > 0 and result["Q4_1 side products"] > 0 and result["Python"] > 0
    assert sum(result[p] for p in PARTS) == pytest.approx(result["step_ms"], rel=1e-6)
