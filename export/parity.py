"""The parity report of any export, by family: causal LMs (verify.py), encoders (encoder_graph.py), the LSTM
(lstm_graph.py); and the report as text (CLI) or as rows (the playground's Export tab)."""
from __future__ import annotations

from pathlib import Path

from backend.models import family

from .verify import fixed_text, format_report, verify_export


def verify_any(folder: Path, model, tokenizer) -> dict:
    graph = family(model).export_graph
    if graph == "encoder":
        from .encoder_graph import verify_encoder

        return verify_encoder(folder, model, tokenizer, fixed_text())
    if graph == "lstm":
        from .lstm_graph import verify_lstm

        return verify_lstm(folder, model, tokenizer, fixed_text())
    return verify_export(folder, model, tokenizer)


def report_rows(r: dict) -> list[tuple[str, str]]:
    """(check, value) rows of an encoder's or an LSTM's report."""
    if r.get("kind") == "encoder":
        rows = [("sentences (padded into one batch)", f"{r['sentences']} · {r['tokens']} tokens, "
                                                      f"{r['padded_positions']} padding"),
                ("max abs logit difference", f"{r['max_abs_logit_diff']:.2e}")]
        if r["head"] == "classify":
            return rows + [("predicted labels identical", f"{100 * r['label_agreement']:.0f} %"),
                           ("labels eager", ", ".join(r["labels_eager"])),
                           ("labels onnx", ", ".join(r["labels_onnx"]))]
        return rows + [(f"top-1 agreement on {r['masked_positions']} [MASK] positions",
                        f"{100 * r['top1_agreement']:.1f} %")]
    return [("positions of fixed text", str(r["positions"])),
            ("max abs logit difference (whole text)", f"{r['max_abs_logit_diff']:.2e}"),
            ("max abs logit difference (state carried step by step)", f"{r['max_abs_logit_diff_state_carried']:.2e}"),
            ("top-1 agreement", f"{100 * r['top1_agreement']:.1f} %"),
            ("greedy tokens identical", f"{r['greedy_match_length']} / {r['greedy_tokens']}")]


def format_any(report: dict, quant: str = "") -> str:
    if report.get("kind") not in ("encoder", "lstm"):
        return format_report(report, quant)
    what = "encoder" if report["kind"] == "encoder" else "LSTM"
    lines = [f"parity of the {quant or 'ONNX'} {what} export against eager fp32:"]
    lines += [f"  {check:<56}{value}" for check, value in report_rows(report)]
    return "\n".join(lines)
