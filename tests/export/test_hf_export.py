"""`python -m export --format hf` (export/hf_folder.py): an HF folder with bf16 safetensors, config, tokenizer, chat
template and generation config, which transformers reloads with logits within 1e-3 of ours (what vLLM serves)."""
import json

import pytest
import torch

import backend
from export.__main__ import main
from tests.backend.tiny import make_tiny

transformers = pytest.importorskip("transformers")

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    make_tiny("llama", root / "src")
    assert main(["--format", "hf", "--model", str(root / "src"), "--out", str(root / "out")]) == 0
    return root / "src", root / "out"


def test_folder_has_what_vllm_reads(exported):
    from safetensors import safe_open

    _, out = exported
    names = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_transformers_reloads_with_equal_logits(exported):
    src, out = exported
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16).eval()
    ours = backend.load(out, dtype="bfloat16", device="cpu")
    with torch.no_grad():
        t_logits = theirs(ids).logits.float()
    o_logits = ours.logits(ids)
    # the same bf16 weights and bf16 compute on both sides
    assert (t_logits - o_logits).abs().max().item() <= 1e-3
    theirs32 = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours32 = backend.load(out, dtype="float32", device="cpu")
    with torch.no_grad():
        assert (theirs32(ids).logits - ours32.logits(ids)).abs().max().item() <= 1e-4
    # and the export is the source model, rounded to bf16
    original = backend.load(src, dtype="float32", device="cpu").logits(ids)
    assert (original - ours32.logits(ids)).abs().max().item() <= 0.05
    assert torch.equal(original.argmax(-1), ours32.logits(ids).argmax(-1))


def test_tokenizer_and_chat_template_reload(exported):
    src, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = backend.load(src)
    assert tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == \
        ours.tokenizer.render_chat(PROMPT)
    assert tok("The capital of France")["input_ids"] == ours.tokenizer.encode("The capital of France")


def test_refuses_a_non_empty_target(exported, capsys):
    src, out = exported
    before = sorted(p.name for p in out.iterdir())
    assert main(["--format", "hf", "--model", str(src), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
