"""CLI: python -m backend info|generate|chat|fill-mask|bench|race|profile|finetune|bench-train|evaluate|cache|
first-answers|bench-startup (each verb is one plain function)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import FornaxError


def _load(args):
    from .loading import load

    handle = load(args.model, dtype=args.dtype)
    info = handle.info()
    print(f"[fornax] loaded {handle.config.name or args.model} ({handle.config.family}, "
          f"{info['parameters'] / 1e6:.0f}M params, {handle.dtype}, runs on {', '.join(handle.runner_names())}) "
          f"in {handle.load_seconds:.1f} s", file=sys.stderr)
    backend = getattr(args, "backend", None)
    if backend is not None:
        handle.runner(backend, progress=lambda f, message: print(f"[fornax] {message}", file=sys.stderr))
    return handle


def _params(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                stop=args.stop or [], seed=args.seed, num_samples=args.num_samples)


def _print_stream(stream, num_samples: int):
    if num_samples == 1:
        for delta in stream:
            print(delta.text, end="", flush=True)
        print()
    else:  # interleaved deltas would be unreadable: print each sample whole
        for _ in stream:
            pass
        for i, text in enumerate(stream.result.texts):
            print(f"--- sample {i}\n{text}")
    print(f"[fornax] {stream.result.timings.summary()}", file=sys.stderr)


def cmd_info(args):
    print(json.dumps(_load(args).info(), indent=2))


def cmd_generate(args):
    handle = _load(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    _print_stream(handle.stream(prompt, backend=args.runner, **_params(args)), args.num_samples)


def cmd_chat(args):
    handle = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset clears the conversation, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        stream = handle.stream(messages, backend=args.runner, **_params(args))
        if interactive:
            print("model> ", end="", flush=True)
        _print_stream(stream, 1)
        messages.append({"role": "assistant", "content": stream.result.text})


def cmd_fill_mask(args):
    handle = _load(args)
    text = args.text if args.text is not None else sys.stdin.read()
    if args.pll:
        result = handle.pseudo_log_likelihood(text)
        for t in result["tokens"]:
            print(f"{t['token']:>16}  {t['logprob']:8.3f}")
        print(f"pseudo-log-likelihood {result['pll']:.3f}, pseudo-perplexity {result['pseudo_perplexity']:.2f}")
        return
    for n, candidates in enumerate(handle.fill_mask(text, top_k=args.top_k), 1):
        print(f"[MASK] {n}: " + "  ".join(f"{c['token']} {c['prob']:.3f}" for c in candidates))


def cmd_bench(args):
    from .bench.speed import run_bench

    run_bench(model=args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads,
              csv_path=args.csv, skip_transformers=args.skip_transformers,
              backends=[b for b in args.runners.replace(",", " ").split() if b], onnx=args.onnx)


def cmd_race(args):
    from .bench.race import QUICK_CONFIGS, QUICK_FIDELITY_TOKENS, race_paths, run_race

    select = [s for s in (args.paths or "").replace(",", " ").split() if s] or None
    suffix = ""
    if args.scale:  # a synthetic model of that size in place of --model; its own docs/ files
        from .bench.synthetic import synthetic_gguf

        args.model, suffix = str(synthetic_gguf(args.scale)), f"-{args.scale}"
        if not args.onnx:
            print(f"[race] no --onnx: export the synthetic model first, e.g. python -m export --model {args.model} "
                  f"--out exports/{args.scale}-int4 --quant int4", file=sys.stderr)
    paths = race_paths(args.model, args.onnx or [], args.llama_python, args.genai_python, select)
    opts = dict(repeats=args.repeats)
    if args.configs:
        opts["configs"] = tuple(tuple(int(n) for n in c.split("+")) for c in args.configs.split(","))
    if args.batches:
        opts["batches"] = tuple(int(b) for b in args.batches.split(","))
    if args.quick:  # a smoke run writes no docs/ files unless asked to
        opts.update(repeats=1, configs=QUICK_CONFIGS, fidelity_tokens=QUICK_FIDELITY_TOKENS)
    default = lambda given, path: given if given is not None else ("" if args.quick else path)  # noqa: E731
    run_race(args.model, paths, threads=args.threads, text=args.text,
             csv_path=default(args.csv, f"docs/race{suffix}.csv"), png_path=default(args.png, f"docs/race{suffix}.png"),
             **opts)


def cmd_profile(args):
    from .bench.profile import print_split, profile_decode

    print_split(profile_decode(args.onnx, args.prompt_tokens, args.new_tokens, args.threads), args.onnx)


# finetune flags -> TrainConfig fields (None = not given: the --config file's value or the default)
TRAIN_FLAGS = {
    "data": str, "out": str, "mode": str, "task": str, "model": str, "preset": str, "vocab_size": int, "steps": int,
    "lr": float, "min_lr_ratio": float, "warmup_steps": int, "weight_decay": float, "grad_clip": float,
    "batch_size": int, "grad_accum": int, "seq_len": int, "lora_r": int, "lora_alpha": float, "lora_dropout": float,
    "eval_every": int, "sample_every": int, "save_every": int, "sample_tokens": int, "seed": int,
    "val_fraction": float, "device": str, "kernels": str, "strategy": str,  # strategy: ddp | fsdp (training/fsdp.py)
}


def _train_config(args):
    from pathlib import Path

    from .errors import TrainError
    from .training import TrainConfig

    base = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise TrainError(f"cannot read the training config {args.config}: {e}") from e
    for name in TRAIN_FLAGS:
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    if args.lora_targets:
        base["lora_targets"] = [t for t in args.lora_targets.replace(",", " ").split() if t]
    if args.sample_prompt:
        base["sample_prompts"] = args.sample_prompt
    if args.resume:
        base["resume"] = True
    if args.nsp:
        base["nsp"] = True
    return TrainConfig.from_dict(base).check()


def cmd_finetune(args):
    import signal
    import threading

    from .training import train
    from .training.jobs import mark_failed

    try:
        cfg = _train_config(args)
    except FornaxError as e:
        if args.job_dir:
            mark_failed(args.job_dir, str(e))
        raise
    stop = []

    def on_signal(signum, frame):  # SIGTERM or a first Ctrl-C = cancel: stop at the next step with a checkpoint
        if signum == signal.SIGINT and stop:
            raise KeyboardInterrupt
        stop.append(True)
        print("\n[fornax] stopping after this step (a checkpoint is saved); Ctrl-C again to abort", file=sys.stderr)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        state = train(cfg, job_dir=args.job_dir, should_stop=lambda: bool(stop), progress=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(f"[fornax] {state['status']} at step {state['step']}/{state['total_steps']}: {state['message']}",
          file=sys.stderr)


def cmd_bench_train(args):
    if args.compare:  # learning curves of presets trained alike, not engine speed
        from .bench.curves import run_curves

        presets = [p for p in args.compare_presets.replace(",", " ").split() if p]
        run_curves(presets, steps=args.steps or 200, seq_len=args.seq_len or 64, batch_size=args.batch_size or 8,
                   lr=args.lr, eval_every=args.eval_every, data=args.data, csv_path=args.csv, png_path=args.png,
                   threads=args.threads)
        return
    from .bench.train import run_bench_train

    run_bench_train(steps=args.steps or 30, threads=args.threads, preset=args.preset, seq_len=args.seq_len or 256,
                    batch_size=args.batch_size or 8, csv_path=args.csv, repeats=args.repeats)


def cmd_first_answers(args):
    from .bench import first_answers
    from .generation import presets

    handle = _load(args)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in presets.PRESETS]
    if unknown:
        raise FornaxError(f"unknown preset(s) {', '.join(unknown)}; presets: {', '.join(presets.PRESETS)}")
    chosen = {n: presets.PRESETS[n] for n in names}
    from tqdm import tqdm

    batches = -(-args.seeds // 5)
    bar = tqdm(total=len(first_answers.QUESTIONS) * (1 + len(chosen) * batches), desc="questions", file=sys.stderr)
    rates = first_answers.compare(handle, chosen, seeds=args.seeds, runner=args.runner,
                                  progress=lambda done, total: bar.update(1))
    bar.close()
    opening, _ = presets.opening_preset(handle.info())
    print(f"{len(first_answers.QUESTIONS)} questions; presets over {args.seeds} samples each; "
          f"this model opens on {opening!r}")
    for name, r in rates.items():
        print(f"{name:<12} {r.right:>4} / {r.asked:<4} right  {r.rate:6.1%}")


def cmd_bench_startup(args):
    from .bench.startup import run_bench_startup

    run_bench_startup(runs=args.runs, warm=args.warm, prepare=args.prepare)


def cmd_evaluate(args):
    from .scoring.cli import run_cli

    run_cli(args)


def cmd_cache(args):
    from .disk import caches as cache_dir

    found = cache_dir.entries()
    print(cache_dir.describe(found))
    if args.clear:
        removed = cache_dir.clear()
        print(f"cleared {len(removed)} entries, {sum(e.bytes for e in removed) / 1e6:.1f} MB")


def model_args(p):
    p.add_argument("--model", default="default", help="default | HF folder | .gguf file | hub id")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def sampling_args(p):
    p.add_argument("--runner", "--backend", dest="runner", default=None,
                   help="execution path (runner): eager (default), compiled (torch.compile; compiles on first use), "
                        "triton (CUDA), onnx (an export folder)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)


def add_run_verbs(sub) -> None:
    """info, generate, chat, fill-mask: load a model and run it."""
    p = sub.add_parser("info", help="load a model and print what it is")
    model_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="complete a prompt (streamed)")
    model_args(p)
    sampling_args(p)
    p.add_argument("--prompt", default=None, help="the prompt (default: read standard input)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="chat with the model's chat template")
    model_args(p)
    sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("fill-mask", help="an encoder's top-k words for each [MASK] (or --pll: score the text)")
    model_args(p)
    p.add_argument("--text", default=None, help='e.g. "The capital of France is [MASK]." (default: standard input)')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--pll", action="store_true", help="pseudo-log-likelihood: each token masked in turn")
    p.set_defaults(func=cmd_fill_mask)


def add_bench_verbs(sub) -> None:
    """bench, race, bench-train, first-answers, bench-startup: measurements."""
    p = sub.add_parser("bench", help="time our execution paths against transformers' on the same model")
    p.add_argument("--model", default="default")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", default=None, help="append tidy result rows to this CSV file")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--backends", default="eager,compiled,onnx", help="our paths to time (comma-separated)")
    p.add_argument("--onnx", default=None, help="an fp32 export folder (default: the export cache's, if any)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("race", help="every Fornax path and the peers (transformers, llama.cpp, onnxruntime-genai) on "
                                    "the same token ids: speed, bandwidth, memory and fidelity")
    p.add_argument("--model", default="default")
    p.add_argument("--scale", choices=("360m", "1b"), default=None,
                   help="race a synthetic model of this size instead (random weights, Q4_1, built once and cached: "
                        "speed only; its files docs/race-SCALE.csv/png)")
    p.add_argument("--onnx", action="append", help="an export folder (python -m export); repeatable: fp32, int8, int4")
    p.add_argument("--llama-python", default=None, help="the interpreter of a virtualenv with llama-cpp-python")
    p.add_argument("--genai-python", default=None, help="the interpreter of a virtualenv with onnxruntime-genai")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the table shows medians")
    p.add_argument("--paths", default=None, help="only these (comma-separated): eager, compiled, onnx (or onnx-int4 "
                                                 "...), eager-cuda, compiled-cuda, triton, compiled+triton, "
                                                 "transformers, llama.cpp, genai")
    p.add_argument("--configs", default=None, help="prompt+new tokens, comma-separated (default 128+128,512+256)")
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 1,4)")
    p.add_argument("--text", default=None, help="fidelity text file (default: a Python docs topic)")
    p.add_argument("--csv", default=None, help="one row per path x configuration x batch (default docs/race.csv; "
                                               "--quick: none; '' = none)")
    p.add_argument("--png", default=None, help="a chart (default docs/race.png; needs matplotlib; '' = none)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small configuration, one repeat")
    p.set_defaults(func=cmd_race)
    p = sub.add_parser("profile", help="an ONNX export's decode step split by onnxruntime's profiler: 4-bit "
                                       "matmuls, Q4_1 side products, attention, other operators, ORT, Python")
    p.add_argument("--onnx", required=True, help="an export folder (python -m export)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_profile)
    p = sub.add_parser("bench-train", help="time our training loop against transformers' Trainer, same model and data")
    p.add_argument("--steps", type=int, default=None, help="default 30 (--compare: 200)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="small-llama")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 (--compare: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--compare", action="store_true", help="instead: validation-loss curves of presets pretrained "
                   "alike on the same text (LSTM vs Transformer), with the unigram baseline; see bench_curves.py")
    p.add_argument("--compare-presets", default="tiny-lstm,tiny-llama")
    p.add_argument("--lr", type=float, default=3e-3, help="--compare: the peak learning rate of every preset")
    p.add_argument("--eval-every", type=int, default=10, help="--compare: validation every N steps")
    p.add_argument("--data", default=None, help="--compare: a text file (default: 60 kB of Python's docs)")
    p.add_argument("--png", default=None, help="--compare: write the curves to this PNG")
    p.add_argument("--repeats", type=int, default=2, help="alternated runs per engine; the best is kept")
    p.add_argument("--csv", default=None, help="append tidy result rows to this CSV file (--compare: write it)")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("first-answers", help="how often sampling presets answer simple questions right, vs greedy")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--runner", "--backend", dest="runner", default=None, help="execution path (default: eager)")
    p.add_argument("--presets", default="Small model,Precise,Balanced,Creative")
    p.add_argument("--seeds", type=int, default=10, help="samples per question and preset (batches of five)")
    p.set_defaults(func=cmd_first_answers)
    p = sub.add_parser("bench-startup", help="cold start of the playground on the default model: page and first answer")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warm", action="store_true", help="keep the cache between runs (no first conversion)")
    p.add_argument("--prepare", choices=["fast", "none"], default="fast")
    p.set_defaults(func=cmd_bench_startup)


def add_train_and_score_verbs(sub) -> None:
    """finetune, evaluate, cache."""
    p = sub.add_parser("finetune", help="train: LoRA or full finetuning of a model, or pretraining from scratch",
                       description="Data: .txt (plain text), .jsonl ({'text'} / {'messages'} / {'text','label'} per "
                                   "line) or .csv (text,label). See backend/training/data.py.")
    p.add_argument("--config", default=None, help="a TrainConfig JSON file; flags given override it")
    for name, kind in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--lora-targets", default=None, help="e.g. attn.qkv,attn.proj (default: every projection)")
    p.add_argument("--sample-prompt", action="append", help="prompt sampled during training (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--nsp", action="store_true", help="pretrain an encoder with next-sentence prediction too "
                   "(sentence pairs from the text's own order; saved as BertForPreTraining)")
    p.add_argument("--job-dir", default=None, help="write live state to DIR/state.json; DIR/cancel stops the run")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("evaluate", help="score a model: perplexity, BLEU / chrF / ROUGE / exact match, accuracy / "
                                        "F1, backend agreement (recorded in the history)")
    from .scoring.cli import add_arguments as evaluate_arguments

    evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("cache", help="list the on-disk caches (GGUF conversions, exports, zips, kept uploads)")
    p.add_argument("--clear", action="store_true", help="delete every cache entry")
    p.set_defaults(func=cmd_cache)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m backend", description="Fornax backend")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (add_run_verbs, add_bench_verbs, add_train_and_score_verbs):
        add(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FornaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
