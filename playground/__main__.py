"""python -m playground [--host 127.0.0.1] [--port 7860] [--model default] [--dtype auto] [--public | --private]
[--api-only] [--prepare fast|none]

One server: the playground at / and the OpenAI-compatible API at /v1 (playground/openai_api.py)."""
import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m playground", description="Open the Fornax playground.")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--model", default="default",
                        help="model loaded at start: default, a folder, a .gguf file, a Hub id, or 'none'")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--public", dest="public", action="store_true", default=None,
                      help="public deployment: no server paths, caps on uploads and requests, per-visitor jobs "
                           "(the default on a Hugging Face Space or when --host is not loopback)")
    mode.add_argument("--private", dest="public", action="store_false",
                      help="a local user's playground: server paths and no caps (the default on loopback)")
    parser.add_argument("--api-only", action="store_true",
                        help="serve only the OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions)")
    parser.add_argument("--prepare", choices=["fast", "none"], default=None,
                        help="fast (the default; FORNAX_PREPARE sets another): after start-up, prepare the model's "
                             "fastest path as faithful as llama.cpp (a verified ONNX export) in the background and "
                             "open the Backend selector on it; none: stay on eager")
    args = parser.parse_args(argv)

    from playground import choose_mode

    public = choose_mode(args.public, args.host)
    print(f"playground: {'public' if public else 'private'} mode")

    import uvicorn

    from playground import create_app, current, openai_api  # imported late: --help stays instant

    model = None if args.model.lower() == "none" else args.model
    if args.api_only:
        if model:
            current.load(model, dtype=None if args.dtype == "auto" else args.dtype)
        app = openai_api.server(None)
    else:
        app = openai_api.server(create_app(model, dtype=None if args.dtype == "auto" else args.dtype,
                                           prepare=args.prepare))
    # No share tunnel, ever: it would be an outbound connection and a public URL.
    print(f"playground: http://{args.host}:{args.port}/ (OpenAI API at /v1)" if not args.api_only else
          f"playground: OpenAI API at http://{args.host}:{args.port}/v1")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    except OSError as e:  # typically the port is taken
        raise SystemExit(f"playground: cannot serve on {args.host}:{args.port}: {e}. Try another --port.")
    print("playground: stopped")  # Ctrl-C: uvicorn has shut down gracefully (and swallowed the interrupt)


if __name__ == "__main__":
    main()
