"""Parity of an export against our eager model on a fixed text: logits, KL, top-1, greedy match, perplexity; and
fidelity (KL, top-1) on a second, held-out text, which the playground reads to pick the fastest faithful export."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from backend.handle import ModelHandle
from backend.runners.onnx import OnnxRunner, read_onnx_config
from backend.scoring.agreement import logits_agreement

GREEDY_TOKENS = 64
TEXT_TOKENS = 128
HELDOUT_TOKENS = 256  # scored positions (the window is one token longer)
HELDOUT_TEXT = "pydoc_data.topics['naming']"


def fixed_text() -> str:
    """English prose that ships with Python (pydoc's help on the `with` statement)."""
    from pydoc_data.topics import topics

    return topics["with"]


def heldout_text() -> str:
    """Different prose that also ships with Python (the reference on naming and binding), for fidelity numbers
    that were not looked at while choosing the export's settings."""
    from pydoc_data.topics import topics

    return topics["naming"]


def heldout_fidelity(model, runner, tokenizer) -> dict:
    """Teacher-forced KL(eager || onnx) and top-1 agreement on HELDOUT_TOKENS positions of heldout_text()."""
    window = min(HELDOUT_TOKENS + 1, model.config.max_seq_len)  # a tiny test model has a short context
    ids = torch.tensor([tokenizer.encode(heldout_text(), add_special_tokens=False)[:window]])
    agree = logits_agreement(model(ids)[0].float(), runner.full_logits(ids)[0].float(), ids[0])
    return {"mean_kl": agree["mean_kl"], "top1_agreement": agree["top1_agreement"], "tokens": agree["tokens"],
            "text": HELDOUT_TEXT}


@torch.inference_mode()
def verify_export(folder: str | Path, model, tokenizer, text: str | None = None) -> dict:
    folder = Path(folder)
    runner = OnnxRunner(folder / "model.onnx", read_onnx_config(folder))
    ids = torch.tensor([tokenizer.encode(text or fixed_text(), add_special_tokens=False)[:TEXT_TOKENS]])
    ref = model(ids)[0].float()                       # (T, V)
    got = runner.full_logits(ids)[0].float()
    agree = logits_agreement(ref, got, ids[0])  # KL(eager || onnx), top-1, perplexities: positions predicting a token
    handle = ModelHandle(model, tokenizer, "verify", runners={"onnx": runner})
    prompt = ids[0, :16].tolist()
    greedy = {name: handle.generate(prompt, backend=name, max_new_tokens=GREEDY_TOKENS, temperature=0,
                                    ignore_eos=True).completions[0].token_ids for name in ("eager", "onnx")}
    match = next((i for i, (a, b) in enumerate(zip(greedy["eager"], greedy["onnx"])) if a != b), GREEDY_TOKENS)
    per_position = (ref - got).abs().amax(-1)
    return {
        "positions": ids.shape[1],
        "max_abs_logit_diff": per_position.max().item(),
        "max_abs_logit_diff_per_position": [round(x, 6) for x in per_position.tolist()],
        "mean_kl": agree["mean_kl"],
        "top1_agreement": agree["top1_agreement"],
        "greedy_match_length": match,
        "greedy_tokens": GREEDY_TOKENS,
        "perplexity_eager": agree["perplexity_ref"],
        "perplexity_onnx": agree["perplexity_other"],
        "heldout": heldout_fidelity(model, runner, tokenizer),
    }


def format_report(report: dict, quant: str = "") -> str:
    r = report
    return "\n".join([
        f"parity of the {quant or 'ONNX'} export against eager fp32 on {r['positions']} tokens of fixed text:",
        f"  max |logit diff|      {r['max_abs_logit_diff']:.2e}",
        f"  mean KL(eager||onnx)  {r['mean_kl']:.2e}",
        f"  top-1 agreement       {100 * r['top1_agreement']:.1f} %",
        f"  greedy match          {r['greedy_match_length']} / {r['greedy_tokens']} tokens",
        f"  perplexity            {r['perplexity_eager']:.3f} eager, {r['perplexity_onnx']:.3f} onnx "
        f"({r['perplexity_onnx'] - r['perplexity_eager']:+.3f})",
        *([f"  held-out text         KL {h['mean_kl']:.2e}, top-1 {100 * h['top1_agreement']:.1f} % "
           f"({h['tokens']} tokens of {h['text']})"] if (h := r.get("heldout")) else []),
    ])


def save_report(folder: Path, report: dict) -> None:
    (Path(folder) / "parity.json").write_text(json.dumps(report, indent=2))
