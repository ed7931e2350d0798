"""atomic_folder (temp -> rename, never losing the previous folder) and the HF <-> Fornax weight-name table."""
import os

import pytest
import torch

import backend
from backend.disk import atomic
from backend.disk.atomic import atomic_folder
from backend.formats.hf import fornax_to_hf, hf_to_fornax
from backend.models.transformer_hf import weight_table
from backend.loading import read_hf_folder, read_weights
from backend.models.transformer import Transformer

from .tiny import make_tiny


def _files(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_new_folder_appears_whole(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()  # nothing visible until the block ends
    assert _files(tmp_path / "out") == {"a.txt": "a"} and os.listdir(tmp_path) == ["out"]


def test_replacing_an_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_folder(tmp_path / "out", replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _files(tmp_path / "out") == {"new.txt": "new"} and os.listdir(tmp_path) == ["out"]


def test_a_failure_mid_write_leaves_the_previous_folder_intact(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "out", replace=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt  # Ctrl-C while writing
    assert _files(tmp_path / "out") == {"old.txt": "old"} and os.listdir(tmp_path) == ["out"]


def test_a_failed_final_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if str(src).startswith(str(tmp_path / ".out.tmp-")) and not (tmp_path / "out").exists():
            raise OSError("disk gone")  # the moment after the old folder was moved aside
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_folder(tmp_path / "out", replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _files(tmp_path / "out") == {"old.txt": "old"} and os.listdir(tmp_path) == ["out"]


def test_without_replace_a_non_empty_target_is_refused_and_an_empty_one_taken(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_folder(tmp_path / "full") as tmp:
            (tmp / "y").write_text("y")
    assert _files(tmp_path / "full") == {"x": "x"}
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty", mode=0o755) as tmp:
        (tmp / "y").write_text("y")
    assert _files(tmp_path / "empty") == {"y": "y"} and (tmp_path / "empty").stat().st_mode & 0o777 == 0o755
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"]


def test_save_pretrained_that_fails_keeps_the_model_already_there(tmp_path, monkeypatch):
    """Issue #10 item 9: saving over a trained model must not delete it before the new one is complete."""
    make_tiny("llama", tmp_path / "hf")
    handle = backend.load(tmp_path / "hf", dtype="float32", device="cpu")
    backend.save_pretrained(handle.model, handle.tokenizer, tmp_path / "out")
    before = read_weights(tmp_path / "out")

    def dying_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", dying_save_file)
    with pytest.raises(backend.ModelLoadError, match="No space left"):
        backend.save_pretrained(handle.model, handle.tokenizer, tmp_path / "out")
    monkeypatch.undo()
    after = read_weights(tmp_path / "out")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


def _llama_with_biases(folder):
    import transformers as tf

    from .tiny import save_tokenizer

    folder.mkdir(exist_ok=True)
    cfg = tf.LlamaConfig(vocab_size=save_tokenizer(folder), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attention_bias=True, mlp_bias=True, eos_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "llama", "llama-untied", "qwen2", "llama-biases"])
def test_the_name_table_round_trips_what_transformers_saved(kind, tmp_path):
    if kind == "llama-biases":
        _llama_with_biases(tmp_path)
    else:
        make_tiny(kind, tmp_path)
    cfg, saved = read_hf_folder(tmp_path)            # exactly the tensors transformers wrote
    ours = hf_to_fornax(dict(saved), cfg)
    expected = Transformer(cfg).state_dict()          # our model's own names and shapes are the reference
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    back = fornax_to_hf(ours, cfg)
    assert back.keys() == saved.keys()
    for name, t in saved.items():
        assert torch.equal(back[name], t), name
    assert len({w.ours for w in weight_table(cfg)}) == len(weight_table(cfg))  # one row per tensor of ours
