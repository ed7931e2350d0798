"""`python -m backend evaluate`: its flags and its one function. Everything the user can get wrong (metric names,
data, window) is checked before the model loads; progress goes to stderr; with --json the last stdout line is one
JSON object of the metric values and what they were measured on."""
from __future__ import annotations

import json
import sys

from .run import KINDS


def add_arguments(p) -> None:
    p.add_argument("--model", default="default", help="default | HF folder | .gguf file | hub id | ONNX export")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--runner", "--backend", dest="runner", default=None,
                   help="execution path that scores (default: the model's own)")
    p.add_argument("--metric", action="append", required=True,
                   help=f"repeatable or comma-separated: {', '.join(KINDS)}")
    p.add_argument("--data", required=True, help=".txt / JSONL {'text'} (perplexity, agreement); JSONL {'prompt' or "
                   "'messages', 'reference'} (bleu, chrf, rouge, exact_match); JSONL {'text','label'} or CSV "
                   "(accuracy, f1, precision, recall)")
    p.add_argument("--max-length", type=int, default=None, help="window length in tokens (default min(1024, context))")
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default max-length / 2)")
    p.add_argument("--against", default=None, help="agreement: the runner compared with --runner")
    p.add_argument("--average", default="macro", choices=["macro", "micro"], help="f1 / precision / recall")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default here)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-history", action="store_true", help="do not record the result in the history")
    p.add_argument("--history", default=None, help="history SQLite file (default <fornax cache>/scores.sqlite)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (last stdout line)")


def run_cli(args) -> dict:
    from ..loading import load
    from .history import History
    from .perplexity import check_window
    from .run import evaluate_model, metric_kind, read_data

    metrics = [m for item in args.metric for m in item.replace(",", " ").split()]
    kind = metric_kind(metrics)
    data = read_data(metrics, args.data)
    if kind == "text" and args.max_length is not None:
        check_window(args.max_length, args.stride)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    stop=args.stop or [], seed=args.seed)
    history = False if args.no_history else History(args.history) if args.history else None
    handle = load(args.model, dtype=args.dtype)
    print(f"[fornax] loaded {args.model} in {handle.load_seconds:.1f} s", file=sys.stderr)
    result = evaluate_model(handle, metrics, data, source=args.model, backend=args.runner, against=args.against,
                            max_length=args.max_length, stride=args.stride, sampling=sampling, average=args.average,
                            history=history, progress=True)
    for name, value in result["values"].items():
        print(f"{name}: {value:.6g}", file=sys.stderr if args.json else sys.stdout)
    if "report" in result:
        report = result["report"]
        print(f"labels {report['labels']}; confusion (rows true, columns predicted): {report['confusion']}",
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({**result["values"], **{k: v for k, v in result.items() if k != "values"}},
                         ensure_ascii=False, default=str))
    return result
