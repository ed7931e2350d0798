"""CLI: python -m export --model SOURCE --out DIR [--quant none|int8|int4] [--format onnx|hf] | python -m export verify DIR

The model's family picks the graph: a causal LM (KV cache), an encoder (optimum's layout) or the LSTM (its state as
inputs/outputs); encoders and LSTMs take none or int8."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backend.errors import FornaxError

from .onnx_export import FLOAT_LAYERS


def cmd_export_hf(args):
    from .hf_folder import export_hf

    info = export_hf(args.model, args.out, dtype=args.dtype)
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in info["sizes_bytes"].items())
    print(f"exported {args.model} to {args.out} as an HF folder ({info['dtype']}) in {info['export_seconds']} s "
          f"({sizes}); serve it with: vllm serve {args.out}")


def cmd_export(args):
    if args.format == "hf":  # an HF folder (bf16 safetensors) for vLLM / transformers: export/hf_folder.py
        return cmd_export_hf(args)
    from tqdm import tqdm

    from .onnx_export import export
    from .parity import format_any

    bar = tqdm(total=100, desc="export", unit="%", bar_format="{l_bar}{bar}| {postfix}")

    def progress(fraction, message):
        bar.n = int(100 * fraction)
        bar.set_postfix_str(message)

    info = export(args.model, args.out, quant=args.quant, verify=not args.no_verify, progress=progress,
                  float_layers=args.float_layers)
    bar.close()
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in info["sizes_bytes"].items())
    print(f"exported {args.model} to {args.out} in {info['export_seconds']} s ({sizes})")
    if info.get("quant_method"):
        print(f"weights: {info['quant_method']}")
    if "report" in info:
        print(format_any(info["report"], "fp32" if args.quant == "none" else args.quant))


def cmd_verify(args):
    from backend.loading import build_model, read_hf_folder, resolve
    from backend.formats.tokenizer import Tokenizer

    from .parity import format_any, verify_any
    from .verify import save_report

    folder = Path(args.folder)
    meta = json.loads((folder / "fornax.json").read_text()) if (folder / "fornax.json").exists() else {}
    source = args.model or meta.get("source")
    if not source:
        raise FornaxError("which model was exported? pass --model SOURCE")
    src = resolve(source)
    model = build_model(*read_hf_folder(src))
    report = verify_any(folder, model, Tokenizer.from_folder(src))
    save_report(folder, report)
    print(format_any(report, {"none": "fp32"}.get(meta.get("quant"), meta.get("quant", ""))))


def cmd_bench(args):
    from backend.bench.speed import run_bench
    from backend.models import family
    from backend.loading import read_hf_config, resolve

    from .cache import cached_export

    fam = family(read_hf_config(resolve(args.model)))  # the config only: no weights read to learn the family
    if fam.kv_cache != "positions":
        raise FornaxError(f"the benchmark races decoding speed of causal Transformers; {args.model} is "
                          f"{fam.described}")
    rows = [("transformers eager", "transformers", "", args.model), ("fornax eager", "fornax", "eager", args.model),
            ("fornax compiled", "fornax", "compiled", args.model)]
    for quant in ("none", "int8", "int4"):
        folder = cached_export(args.model, quant)
        rows.append((f"onnx {'fp32' if quant == 'none' else quant}", "fornax", "onnx", str(folder)))
    run_bench(rows, model=args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
              threads=args.threads, csv_path=args.csv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        p = argparse.ArgumentParser(prog="python -m export bench",
                                    description="eager fp32 vs ONNX fp32/int8/int4 vs transformers, one run")
        p.add_argument("--model", default="default")
        p.add_argument("--prompt-tokens", type=int, default=128)
        p.add_argument("--new-tokens", type=int, default=128)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--csv", default=None)
        p.set_defaults(func=cmd_bench)
        argv = argv[1:]
    elif argv[:1] == ["verify"]:
        p = argparse.ArgumentParser(prog="python -m export verify", description="parity of an export vs eager")
        p.add_argument("folder")
        p.add_argument("--model", default=None, help="the source model (default: the one fornax.json names)")
        p.set_defaults(func=cmd_verify)
        argv = argv[1:]
    else:
        p = argparse.ArgumentParser(prog="python -m export", description="export a model to ONNX (with KV cache)")
        p.add_argument("--model", default="default", help="default | HF folder | .gguf file | hub id")
        p.add_argument("--out", required=True, help="a new (or empty) folder")
        p.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
        p.add_argument("--format", default="onnx", choices=["onnx", "hf"],
                       help="onnx (default) or hf: a Hugging Face folder for vLLM / transformers")
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                       help="--format hf: the weights' dtype")
        p.add_argument("--no-verify", action="store_true", help="skip the parity report")
        p.add_argument("--float-layers", type=int, default=FLOAT_LAYERS,
                       help="int4 from GGUF blocks: how many last layers keep float activations (slower, closer)")
        p.set_defaults(func=cmd_export)
    args = p.parse_args(argv)
    try:
        args.func(args)
    except FornaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
