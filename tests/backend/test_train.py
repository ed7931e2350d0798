"""The training loop in-process on tiny models: loss falls, LoRA trains only its adapters and merges exactly, resume is
exact, chat loss masking, atomic checkpoints, classification, pretraining from scratch."""
import json

import pytest
import torch

import backend
from backend.__main__ import main
from backend.loading import build_model, read_hf_folder
from backend.formats.tokenizer import Tokenizer
from backend.training import (add_lora, chat_sequence, latest_checkpoint, list_checkpoints, merge_lora,
                              read_checkpoint, save_checkpoint, train)
from backend.training import checkpoint as ckpt_module
from backend.data.records import read_records
from backend.data.sequences import IGNORE, Sequences
from backend.training.data import build_data
from backend.training.lora import model_targets
from tests.backend.train_util import chats, labelled_rows, make_base, quick, write_jsonl, write_text


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "tiny-llama")


def test_loss_falls_full_finetune(base, tmp_path):
    data = write_text(tmp_path / "corpus.txt", 12000)
    state = train(quick(data, tmp_path / "out", mode="full", model=str(base), steps=40, lr=3e-3, eval_every=20))
    losses = [loss for _, loss in state["train_loss"]]
    assert state["status"] == "done" and len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    val = state["val_loss"]
    assert [v[0] for v in val] == [0, 20, 40] and val[-1][1] < val[0][1] - 1.0
    assert val[-1][2] == pytest.approx(torch.tensor(val[-1][1]).exp().item())
    h = backend.load(tmp_path / "out")  # the out folder is a model
    assert h.generate("The", max_new_tokens=4, temperature=0).completions[0].tokens


def test_lora_trains_only_adapters_and_merges_exactly(base):
    cfg, state = read_hf_folder(base)
    model = build_model(cfg, state).contiguous_layout()
    assert model_targets(model) == ["attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down"]
    r = 4
    peft_model = add_lora(model, r=r, alpha=8, targets=["attn.qkv", "mlp.down"])
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    d, nh, nkv, hd = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    per_block = r * (d + (nh + 2 * nkv) * hd) + r * (cfg.d_ff + d)   # qkv: in d, out (nh+2nkv)hd; down: in d_ff
    assert sum(trainable.values()) == cfg.n_layer * per_block
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(peft_model(x), model(x)) or (peft_model(x) - model(x)).abs().max() == 0  # B starts at 0
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)  # as if trained
        adapted = peft_model(x)
        merged = merge_lora(peft_model)
        assert type(merged.blocks[0].attn.qkv).__name__ == "Linear" and not any(
            "lora" in n for n, _ in merged.named_parameters())
        assert (merged(x) - adapted).abs().max().item() <= 1e-5


def test_lora_run_changes_only_target_weights(base, tmp_path):
    data = write_text(tmp_path / "corpus.txt", 6000)
    state = train(quick(data, tmp_path / "out", mode="lora", model=str(base), steps=4, lr=1e-2,
                        lora_targets=["attn.qkv", "mlp.down"]))
    assert state["trainable_params"] == 2 * 8 * ((64 + 128) + (172 + 64))
    before = read_hf_folder(base)[1]
    after = read_hf_folder(tmp_path / "out")[1]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "down_proj.weight"))
                           for k in changed), changed


def test_resume_matches_uninterrupted_run(base, tmp_path):
    data = write_text(tmp_path / "corpus.txt", 8000)
    kw = dict(mode="lora", model=str(base), steps=10, lr=5e-3, lora_dropout=0.1, warmup_steps=3)  # dropout: RNG
    whole = train(quick(data, tmp_path / "a", **kw))
    polls = []

    def stop_after_five_steps():  # asked before every step
        polls.append(1)
        return len(polls) > 5

    stopped = train(quick(data, tmp_path / "b", **kw), should_stop=stop_after_five_steps)
    assert stopped["status"] == "cancelled" and stopped["step"] == 5
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [5]
    with pytest.raises(backend.FornaxError, match="resume"):
        train(quick(data, tmp_path / "b", **kw))          # a checkpoint is never silently overwritten
    resumed = train(quick(data, tmp_path / "b", resume=True, **kw))
    assert resumed["status"] == "done" and [s for s, _ in resumed["train_loss"]] == list(range(1, 11))
    a = torch.tensor([loss for _, loss in whole["train_loss"]])
    b = torch.tensor([loss for _, loss in resumed["train_loss"]])
    assert (a - b).abs().max().item() <= 1e-5, (a, b)
    wa, wb = read_hf_folder(tmp_path / "a")[1], read_hf_folder(tmp_path / "b")[1]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_chat_loss_mask_is_exactly_the_assistant_turns(base, tmp_path):
    tokenizer = Tokenizer.from_folder(base)
    messages = chats(1)[0]["messages"]
    ids, mask = chat_sequence(tokenizer, messages)
    rendered = tokenizer.render_chat(messages, add_generation_prompt=False)
    enc = tokenizer.tk.encode(rendered, add_special_tokens=False)
    assert enc.ids == ids
    # character spans of each assistant reply and its end-of-turn marker, found in the rendered template
    spans, start = [], 0
    for m in messages:
        if m["role"] == "assistant":
            head = rendered.index("<|im_start|>assistant\n", start) + len("<|im_start|>assistant\n")
            end = rendered.index("<|im_end|>\n", head) + len("<|im_end|>\n")
            spans.append((head, end))
            start = end
    inside = [any(a <= s and e <= b for a, b in spans) for s, e in enc.offsets]
    assert mask == inside and sum(mask) > 0
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "2 plus 1 is 3.<|im_end|>\nYou are welcome.<|im_end|>\n"
    seqs = Sequences()
    seqs.add(ids, mask)
    x, y = seqs.batch([0])
    assert torch.equal(x[0], torch.tensor(ids[:-1]))
    assert [t != IGNORE for t in y[0].tolist()] == mask[1:]

    data = write_jsonl(tmp_path / "chat.jsonl", chats(20))
    built = build_data(read_records(data), tokenizer, 96, 0.1, 0)
    assert built.task == "chat" and len(built.train) == 18 and len(built.val) == 2
    state = train(quick(data, tmp_path / "out", mode="full", model=str(base), steps=3, seq_len=96, batch_size=4,
                        sample_every=3, eval_every=3))
    assert state["status"] == "done" and state["samples"][0]["step"] == 0 and state["samples"][0]["prompt"]


def test_checkpoint_write_killed_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    weights = {"w": torch.randn(4, 4)}
    trainer = {"step": torch.tensor(2), "optimizer": {"state": {}, "param_groups": []}, "rng": ckpt_module.rng_state()}
    first = save_checkpoint(tmp_path, 2, weights, trainer, {"step": 2})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # half a file, then the process "dies"
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", dying_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 4, {"w": torch.randn(4, 4)}, {**trainer, "step": torch.tensor(4)}, {"step": 4})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first and sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    w, t, meta = read_checkpoint(first)
    assert torch.equal(w["w"], weights["w"]) and int(t["step"]) == 2 and meta == {"step": 2}
    # a write killed outright (no cleanup) leaves a hidden temp folder: ignored, then swept by the next save
    (tmp_path / ".checkpoint-000006.tmp-dead").mkdir()
    (tmp_path / ".checkpoint-000006.tmp-dead" / "weights.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path) == first
    save_checkpoint(tmp_path, 8, weights, trainer, {"step": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000008"]


def test_classification_beats_chance(base, tmp_path):
    data = write_jsonl(tmp_path / "moods.jsonl", labelled_rows(160))
    state = train(quick(data, tmp_path / "out", mode="full", model=str(base), steps=40, lr=3e-3, batch_size=16,
                        val_fraction=0.25, eval_every=40))
    m = state["metrics"]
    assert m["n"] == 40 and m["majority_baseline"] == 0.5
    assert m["accuracy"] >= 0.85 and m["macro_f1"] >= 0.85, m


def test_pretrain_from_scratch_cli_loads_and_generates(tmp_path):
    data = write_text(tmp_path / "corpus.txt", 15000, offset=5000)
    out = tmp_path / "out"
    code = main(["finetune", "--mode", "pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny-gpt2",
                 "--vocab-size", "400", "--steps", "30", "--lr", "3e-3", "--seq-len", "32", "--batch-size", "8",
                 "--eval-every", "0", "--sample-every", "30", "--save-every", "0", "--sample-tokens", "8"])
    assert code == 0
    state = json.loads((out / "training.json").read_text())
    losses = [loss for _, loss in state["train_loss"]]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0
    assert [s["step"] for s in state["samples"]] == [0, 0, 30, 30]
    h = backend.load(out)  # no --model: a new byte-level BPE tokenizer and a tiny-gpt2 model
    assert h.config.family == "gpt2" and h.config.vocab_size == 400 and h.tokenizer.vocab_size == 400
    text = "naïve café ☕"
    assert h.tokenizer.decode(h.tokenizer.encode(text)) == text  # byte-level: nothing is unknown
    r = h.generate("The ", max_new_tokens=12, temperature=0)
    assert len(r.completions[0].tokens) > 0 and r.text
