"""The race's results: one row per path x configuration x batch, as a printed table, a CSV and a PNG.

CSV columns: date, model; path, precision; status ("ok", or why the path did not run: "not installed (...)",
"no CUDA GPU here", "failed: ..."); prompt_tokens, new_tokens, batch, threads, repeats; then medians over the
repeats: ttft_ms, prefill_tok_s, decode_tok_s (all sequences of the batch together), peak_rss_mb (the measuring
process's VmHWM); weight_mb (bytes one decode step reads: the weights), gb_s (weight_mb x decode steps per second),
pct_of_floor (gb_s / read_gb_s: how close decoding comes to the machine's read bandwidth), read_gb_s; fidelity
against eager fp32 teacher-forced on held-out text: top1_agreement, mean_kl (KL(eager || path) per position);
greedy_match of greedy_tokens (tokens identical to eager's greedy tokens before the first difference, the least
over the batch); decode_vs_* and prefill_vs_* (this path's tok/s over the peer's, same configuration and batch;
empty when that peer did not run); torch (the version).
"""
from __future__ import annotations

import csv
import os
import statistics
import sys
from pathlib import Path

from . import token_diff as compare

COLUMNS = ["date", "model", "path", "precision", "status", "prompt_tokens", "new_tokens", "batch", "threads",
           "repeats", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "weight_mb", "gb_s",
           "pct_of_floor", "read_gb_s", "top1_agreement", "mean_kl", "greedy_match", "greedy_tokens",
           "decode_vs_transformers", "prefill_vs_transformers", "decode_vs_llama_cpp", "prefill_vs_llama_cpp",
           "decode_vs_genai", "prefill_vs_genai", "torch"]
PEER_COLUMNS = {"transformers": "transformers", "llama.cpp": "llama_cpp", "genai": "genai"}
PEER_LABELS = {"transformers": "transformers eager", "llama.cpp": "llama.cpp", "genai": "onnxruntime-genai"}


def first_divergence(reference: list[int], rows: list[list[int]]) -> int:
    """Greedy tokens identical to the reference before the first difference, the least over the rows."""
    found = [compare.first_divergence(reference, row) for row in rows]
    return min(len(reference) if i is None else i for i in found)


def summary(runs: list[dict], reference: list[int]) -> dict:
    """Medians over the repeats; greedy divergence from the first repeat's tokens."""
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"ttft_s": med("ttft_s"), "prefill_tok_s": med("prefill_tok_s"), "decode_tok_s": med("decode_tok_s"),
            "peak_rss_mb": med("peak_rss_mb"), "weight_bytes": runs[0]["weight_bytes"],
            "greedy_match": first_divergence(reference, runs[0]["tokens"])}


def rows_of(paths, configs, batches, reference: dict, meta: dict) -> list[dict]:
    """Every path's medians per (configuration, batch), its bandwidth figures, fidelity and ratios to the peers.
    A path that did not run (not installed, no CUDA, failed) still gets its rows, with the reason as status."""
    rows = []
    for P, N in configs:
        for B in batches:
            group = []
            for p in paths:
                row = {c: "" for c in COLUMNS}
                row.update(date=meta["date"], model=meta["model"], path=p.label, precision=p.precision,
                           status=p.status or "ok", prompt_tokens=P, new_tokens=N, batch=B, threads=meta["threads"],
                           repeats=meta["repeats"], read_gb_s=round(meta["read_gb_s"], 2), torch=meta["torch"])
                runs = p.runs.get((P, N, B))
                if runs and not p.status:
                    s = summary(runs, reference[(P, N)])
                    read = meta.get("cuda_read_gb_s", meta["read_gb_s"]) if p.device == "cuda" else meta["read_gb_s"]
                    gb_s = s["weight_bytes"] * s["decode_tok_s"] / B / 1e9  # one read of the weights per step
                    row.update(ttft_ms=round(1000 * s["ttft_s"], 1), prefill_tok_s=round(s["prefill_tok_s"], 1),
                               decode_tok_s=round(s["decode_tok_s"], 2), peak_rss_mb=round(s["peak_rss_mb"]),
                               weight_mb=round(s["weight_bytes"] / 1e6, 1), gb_s=round(gb_s, 2),
                               pct_of_floor=round(100 * gb_s / read, 1), read_gb_s=round(read, 2),
                               greedy_match=s["greedy_match"], greedy_tokens=N)
                    if p.fidelity:
                        row.update(top1_agreement=round(p.fidelity["top1_agreement"], 4),
                                   mean_kl=float(f"{p.fidelity['mean_kl']:.3e}"))
                group.append((p, row))
            peers = {p.key: row for p, row in group if p.key in PEER_COLUMNS and row["decode_tok_s"] != ""}
            for p, row in group:
                if row["decode_tok_s"] == "":
                    continue
                for key, peer in peers.items():
                    name = PEER_COLUMNS[key]
                    row[f"decode_vs_{name}"] = round(row["decode_tok_s"] / peer["decode_tok_s"], 3)
                    row[f"prefill_vs_{name}"] = round(row["prefill_tok_s"] / peer["prefill_tok_s"], 3)
            rows += [row for _, row in group]
    return rows


def _cell(value, fmt: str) -> str:
    return "-" if value == "" else format(value, fmt)


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = (f"{'path':22s} {'precision':16s} {'TTFT ms':>8s} {'prefill':>8s} {'decode':>7s} {'GB/s':>5s} "
            f"{'%floor':>6s} {'RSS MB':>6s} {'top-1':>6s} {'KL':>8s} {'greedy':>7s}  decode (prefill) vs peers")
    current = None
    for r in rows:
        config = (r["prompt_tokens"], r["new_tokens"], r["batch"])
        if config != current:
            current = config
            print(f"\n{r['prompt_tokens']}-token prompt + {r['new_tokens']} new, batch {r['batch']}, {r['threads']} "
                  f"threads, median of {r['repeats']} (tok/s; floor: memory read {r['read_gb_s']} GB/s)", file=out)
            print(head, file=out)
        if r["status"] != "ok":
            print(f"{r['path']:22s} {r['precision']:16s} {r['status']}", file=out)
            continue
        greedy = f"{r['greedy_match']}/{r['greedy_tokens']}" if r["greedy_match"] != "" else "-"
        ratios = "  ".join(f"{peer} {r[f'decode_vs_{name}']:.2f}x ({r[f'prefill_vs_{name}']:.2f}x)"
                           for peer, name in PEER_COLUMNS.items()
                           if r[f"decode_vs_{name}"] != "" and r["path"] != PEER_LABELS[peer])
        print(f"{r['path']:22s} {r['precision']:16s} {_cell(r['ttft_ms'], '8.0f')} {_cell(r['prefill_tok_s'], '8.0f')} "
              f"{_cell(r['decode_tok_s'], '7.1f')} {_cell(r['gb_s'], '5.1f')} {_cell(r['pct_of_floor'], '5.0f')}% "
              f"{_cell(r['peak_rss_mb'], '6.0f')} {_cell(r['top1_agreement'], '6.3f')} {_cell(r['mean_kl'], '8.1e')} "
              f"{greedy:>7s}  {ratios}", file=out)


def write_csv(path: str, rows: list[dict]) -> None:
    """This run's rows, one per path x configuration x batch (the file is written anew, whole or not at all)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    print(f"[race] wrote {len(rows)} rows to {path}", file=sys.stderr)


def write_png(path: str, rows: list[dict]) -> bool:
    """Decode and prefill tok/s per path, one panel per configuration. Needs matplotlib (a dev dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[race] matplotlib is not installed: wrote the CSV only, no PNG", file=sys.stderr)
        return False
    ran = [r for r in rows if r["decode_tok_s"] != ""]
    configs = sorted({(r["prompt_tokens"], r["new_tokens"], r["batch"]) for r in ran})
    if not configs:
        return False
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 7), squeeze=False)
    for j, (P, N, B) in enumerate(configs):
        here = [r for r in ran if (r["prompt_tokens"], r["new_tokens"], r["batch"]) == (P, N, B)]
        names = [f"{r['path']}\n{r['precision']}" for r in here]
        for i, (metric, title) in enumerate((("decode_tok_s", "decode"), ("prefill_tok_s", "prefill"))):
            ax = axes[i][j]
            bars = ax.barh(names, [r[metric] for r in here],
                           color=["#dd8452" if r["path"] in PEER_LABELS.values() else "#4c72b0" for r in here])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
            ax.margins(x=0.15)
            ax.invert_yaxis()
            ax.set_title(f"{title} tok/s, {P}+{N}, batch {B}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"Fornax race (blue) and peers (orange): {ran[0]['model']}, {ran[0]['threads']} threads, "
                 f"median of {ran[0]['repeats']}",
                 fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[race] wrote {path}", file=sys.stderr)
    return True
