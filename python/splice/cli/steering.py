"""``splice demo`` and ``splice extract``."""

from __future__ import annotations

from .common import load, model_options


def cmd_demo(args) -> int:
    from ..demo import run_demo

    model, tokenizer = load(args)
    run_demo(model, tokenizer, layers=args.layers, scale=args.scale, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_extract(args) -> int:
    from ..vectors.extract import builtin_pairs, extract_vectors, load_pairs
    from ..vectors.gguf_control import export_control_vector
    from ..vectors.io import save_vectors

    if not args.out.endswith((".safetensors", ".gguf")):
        raise SystemExit("--out must end in .safetensors or .gguf (llama.cpp control vector)")
    positive, negative = load_pairs(args.pairs) if args.pairs else builtin_pairs(args.builtin)
    model, tokenizer = load(args)
    vectors = extract_vectors(model, tokenizer, positive, negative, method=args.method)
    if args.out.endswith(".gguf"):
        vectors.directions.pop(0, None)  # llama.cpp has no slot for layer 0's output
        export_control_vector(vectors, args.out)
    else:
        save_vectors(vectors, args.out)
    print(f"wrote {len(vectors.directions)} layer directions ({args.method}) to {args.out}")
    return 0


def add_commands(sub) -> None:
    demo = sub.add_parser("demo", parents=[model_options()],
                          help="steer the default model and show generations and throughput")
    demo.add_argument("--layers", type=int, nargs="+", default=None, help="layers to steer (default: the demo's)")
    demo.add_argument("--scale", type=float, default=None, help="steering scale (default: the demo's)")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.set_defaults(func=cmd_demo)

    ex = sub.add_parser("extract", parents=[model_options()],
                        help="extract steering vectors from contrastive prompt pairs")
    src = ex.add_mutually_exclusive_group()
    src.add_argument("--pairs", help='JSON file of [{"positive": ..., "negative": ...}, ...]')
    src.add_argument("--builtin", default="happy_sad", help="a built-in pair set (default: happy_sad)")
    ex.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"])
    ex.add_argument("--out", required=True, help="output .safetensors, or .gguf for llama.cpp")
    ex.set_defaults(func=cmd_extract)
