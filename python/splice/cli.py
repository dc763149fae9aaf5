"""The ``splice`` command line: ``demo``, ``extract``, ``bench steer``."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(args):
    from .models.loader import load_model

    return load_model(args.model, dtype=DTYPES[args.dtype])


def cmd_demo(args) -> int:
    from .demo import run_demo

    model, tokenizer = _load(args)
    run_demo(model, tokenizer, layers=args.layers, scale=args.scale, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_extract(args) -> int:
    from .vectors.extract import builtin_pairs, extract_vectors, load_pairs
    from .vectors.gguf_control import export_control_vector
    from .vectors.io import save_vectors

    if not args.out.endswith((".safetensors", ".gguf")):
        raise SystemExit("--out must end in .safetensors or .gguf (llama.cpp control vector)")
    positive, negative = load_pairs(args.pairs) if args.pairs else builtin_pairs(args.builtin)
    model, tokenizer = _load(args)
    vectors = extract_vectors(model, tokenizer, positive, negative, method=args.method)
    if args.out.endswith(".gguf"):
        vectors.directions.pop(0, None)  # llama.cpp has no slot for layer 0's output
        export_control_vector(vectors, args.out)
    else:
        save_vectors(vectors, args.out)
    print(f"wrote {len(vectors.directions)} layer directions ({args.method}) to {args.out}")
    return 0


def cmd_bench_steer(args) -> int:
    from .bench import output, steer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = _load(args)
    report = steer.run(model, batches=tuple(args.batches), prompt_len=args.prompt_len, steps=args.steps,
                       repeats=args.repeats)
    print(output.table(report))
    print(f"backends: {report['backends']}")
    if args.json:
        for path in output.write(report, args.json, plot=not args.no_plot):
            print(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splice", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, dtype="float32"):
        sp.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
        sp.add_argument("--dtype", default=dtype, choices=sorted(DTYPES))

    demo = sub.add_parser("demo", help="steer the default model and show generations and throughput")
    model_args(demo)
    demo.add_argument("--layers", type=int, nargs="+", default=None, help="layers to steer (default: the demo's)")
    demo.add_argument("--scale", type=float, default=None, help="steering scale (default: the demo's)")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.set_defaults(func=cmd_demo)

    ex = sub.add_parser("extract", help="extract steering vectors from contrastive prompt pairs")
    model_args(ex)
    src = ex.add_mutually_exclusive_group()
    src.add_argument("--pairs", help='JSON file of [{"positive": ..., "negative": ...}, ...]')
    src.add_argument("--builtin", default="happy_sad", help="a built-in pair set (default: happy_sad)")
    ex.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"])
    ex.add_argument("--out", required=True, help="output .safetensors, or .gguf for llama.cpp")
    ex.set_defaults(func=cmd_extract)

    bench = sub.add_parser("bench", help="throughput benchmarks")
    bsub = bench.add_subparsers(dest="suite", required=True)
    st = bsub.add_parser("steer", help="steering throughput vs unpatched and forward hooks")
    model_args(st)
    st.add_argument("--json", help="write the report here (and a .png plot beside it)")
    st.add_argument("--no-plot", action="store_true")
    st.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    st.add_argument("--prompt-len", type=int, default=64)
    st.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    st.add_argument("--repeats", type=int, default=5, help="timed runs per setting (median reported)")
    st.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    st.set_defaults(func=cmd_bench_steer)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
