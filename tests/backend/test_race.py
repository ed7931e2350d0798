"""The race harness (backend/bench/race.py) on tiny random models: its fidelity and greedy-divergence columns against an
independent computation with transformers, batch 4 against batch 1, the CSV's rows and columns, missing peers, and
an ONNX export's fidelity. No timing is asserted."""
from __future__ import annotations

import csv
import shutil
import sys

import pytest
import torch

from backend.bench.race import RacePath, RaceError, bench_text, held_out_text, onnx_path, probe, race_paths, run_race
from backend.bench.race_report import COLUMNS, first_divergence
from tests.backend.tiny import make_tiny

P, N, T = 8, 12, 40   # prompt tokens, new tokens, fidelity tokens (the tiny models hold 128 positions)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama, a copy with perturbed weights, and the fp32 ONNX export of the first."""
    from export.onnx_export import export

    root = tmp_path_factory.mktemp("race")
    teacher = make_tiny("llama", root / "teacher")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.04 * torch.randn_like(p))
    teacher.save_pretrained(root / "perturbed")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "teacher" / name, root / "perturbed" / name)
    export(str(root / "teacher"), root / "onnx", verify=False)
    return root


def transformers_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def encode(folder, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def race(models, tmp_path_factory):
    teacher = str(models / "teacher")
    paths = [RacePath("eager", "fornax eager", "fornax", teacher, "fp32", backend="eager"),
             RacePath("perturbed", "perturbed eager", "fornax", str(models / "perturbed"), "fp32", backend="eager"),
             onnx_path(str(models / "onnx")),
             RacePath("transformers", "transformers eager", "transformers", teacher, "fp32", python=sys.executable),
             RacePath("llama.cpp", "llama.cpp", "llama", "", "gguf",
                      status=probe("/nonexistent/bin/python", "llama", "--llama-python")),
             RacePath("genai", "onnxruntime-genai", "genai", teacher, "int4",
                      status=probe(sys.executable, "genai", "--genai-python"))]  # not in the project's venv
    csv_path = tmp_path_factory.mktemp("out") / "race.csv"
    rows = run_race(teacher, paths, threads=1, repeats=1, configs=((P, N),), batches=(1, 4), fidelity_tokens=T,
                    csv_path=str(csv_path), isolate=False)
    return {p.key: p for p in paths}, rows, csv_path


def test_fidelity_equals_an_independent_kl_and_top1(models, race):
    paths, rows, _ = race
    ids = encode(models / "teacher", held_out_text())[:T]
    with torch.no_grad():
        a = transformers_model(models / "teacher")(torch.tensor([ids])).logits[0, :-1]     # (T-1, V)
        b = transformers_model(models / "perturbed")(torch.tensor([ids])).logits[0, :-1]
    la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    got = paths["perturbed"].fidelity
    assert kl > 1e-3 and top1 < 1.0  # the perturbation is big enough to show
    assert got["mean_kl"] == pytest.approx(kl, rel=1e-3)
    assert got["top1_agreement"] == pytest.approx(top1, abs=1e-9)
    row = next(r for r in rows if r["path"] == "perturbed eager" and r["batch"] == 1)
    assert row["mean_kl"] == pytest.approx(kl, rel=1e-3) and row["top1_agreement"] == pytest.approx(top1, abs=1e-4)
    for key in ("eager", "transformers"):
        assert paths[key].fidelity["top1_agreement"] == 1.0 and paths[key].fidelity["mean_kl"] < 1e-9


def test_greedy_divergence_matches_transformers_greedy(models, race):
    paths, rows, _ = race
    prompt = torch.tensor([encode(models / "teacher", bench_text())[:P]])
    kwargs = dict(max_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = transformers_model(models / "teacher").generate(prompt, **kwargs)[0, P:].tolist()
        b = transformers_model(models / "perturbed").generate(prompt, **kwargs)[0, P:].tolist()
    expected = 0
    while expected < N and a[expected] == b[expected]:
        expected += 1
    assert expected < N  # the perturbed model does diverge within N tokens
    for batch in (1, 4):
        by_path = {r["path"]: r for r in rows if r["batch"] == batch}
        assert by_path["perturbed eager"]["greedy_match"] == expected
        assert by_path["fornax eager"]["greedy_match"] == N
        assert by_path["transformers eager"]["greedy_match"] == N


def test_first_divergence():
    assert first_divergence([1, 2, 3, 4], [[1, 2, 3, 4]]) == 4
    assert first_divergence([1, 2, 3, 4], [[1, 2, 9, 4]]) == 2
    assert first_divergence([1, 2, 3, 4], [[1, 2, 3, 4], [7, 2, 3, 4]]) == 0  # the worst row counts
    assert first_divergence([1, 2, 3, 4], [[1, 2]]) == 2


def test_batch_4_greedy_equals_batch_1(race):
    paths, _, _ = race
    for key in ("eager", "perturbed", "onnx-fp32", "transformers"):
        one = paths[key].runs[(P, N, 1)][0]["tokens"]
        four = paths[key].runs[(P, N, 4)][0]["tokens"]
        assert len(one) == 1 and len(four) == 4 and len(one[0]) == N
        assert all(row == one[0] for row in four), key


def test_onnx_export_fidelity_is_float_rounding(race):
    paths, rows, _ = race
    f = paths["onnx-fp32"].fidelity
    assert f["top1_agreement"] == 1.0 and f["mean_kl"] < 1e-6
    assert all(r["greedy_match"] == N for r in rows if r["path"] == "onnx fp32")


def test_csv_has_a_row_per_path_and_configuration(race):
    paths, rows, csv_path = race
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        written = list(reader)
    assert sorted((r["path"], r["batch"]) for r in written) == sorted(
        (p.label, str(b)) for p in paths.values() for b in (1, 4))
    for r in written:
        assert (r["prompt_tokens"], r["new_tokens"]) == (str(P), str(N))
        if r["status"] == "ok":
            assert float(r["decode_tok_s"]) > 0 and float(r["prefill_tok_s"]) > 0 and float(r["gb_s"]) > 0
            assert float(r["decode_vs_transformers"]) > 0 and r["decode_vs_llama_cpp"] == ""


def test_missing_peers_get_not_installed_rows(race):
    _, rows, _ = race
    for name in ("llama.cpp", "onnxruntime-genai"):
        mine = [r for r in rows if r["path"] == name]
        assert len(mine) == 2 and all(r["status"].startswith("not installed") for r in mine)
        assert all(r["decode_tok_s"] == "" for r in mine)


def test_race_paths_select_and_status(models):
    teacher = str(models / "teacher")
    paths = {p.key: p for p in race_paths(teacher, [str(models / "onnx")], genai_python="/nonexistent/python",
                                          select=["onnx", "genai", "llama.cpp", "triton"])}
    assert set(paths) == {"eager", "onnx-fp32", "genai", "llama.cpp", "triton"}
    assert paths["genai"].status.startswith("not installed")
    assert paths["llama.cpp"].status == "no GGUF file for this model"
    assert paths["triton"].status == ("" if torch.cuda.is_available() else "no CUDA GPU here")
    with pytest.raises(RaceError, match="unknown path"):
        race_paths(teacher, select=["warp-drive"])
    with pytest.raises(RaceError, match="no model.onnx"):
        onnx_path(str(models / "teacher"))


def test_a_measurement_in_its_own_process(models, tmp_path):
    """The real race runs every Fornax measurement in a child process: the job and its result cross as JSON."""
    teacher = str(models / "teacher")
    path = RacePath("eager", "fornax eager", "fornax", teacher, "fp32", backend="eager")
    rows = run_race(teacher, [path], threads=1, repeats=1, configs=((P, 4),), batches=(1,), fidelity_tokens=16)
    assert rows[0]["status"] == "ok" and rows[0]["greedy_match"] == 4 and rows[0]["peak_rss_mb"] > 0
    assert path.fidelity["top1_agreement"] == 1.0
