"""The ``splice`` command line: ``demo``, ``extract``, ``profile layers``, ``route train``, ``bench steer|skip``."""

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


def cmd_profile_layers(args) -> int:
    from .calibration.text import wikitext_windows
    from .skipping.profile import layers_for_budget, plot_profile, profile_layers

    model, tokenizer = _load(args)
    num_layers = model.config.num_hidden_layers
    greedy = layers_for_budget(num_layers, args.layers, args.speedup) if (args.layers or args.speedup) else 0
    windows = wikitext_windows(tokenizer, args.windows, args.length)
    profile = profile_layers(model, windows, greedy_layers=greedy, candidates=args.candidates)
    path = profile.save(args.json)
    plot = plot_profile(profile, path.with_suffix(".png"))
    order = sorted(range(num_layers), key=lambda l: profile.removal_kl[l])
    print(f"full perplexity {profile.full_ppl:.2f}; layers by removal KL (cheapest first): {order}")
    if greedy:
        print(f"greedy skip set ({greedy} layers): {sorted(profile.greedy_order)}; joint KL {profile.greedy_kl[-1]:.4f}")
    print(f"wrote {path} and {plot}")
    return 0


def cmd_route_train(args) -> int:
    from .adapters.architecture import Adapter
    from .calibration.text import wikitext_windows
    from .skipping.router_training import fit_influence_router, fit_linear_router, measure_routing_data

    if not args.out.endswith(".safetensors"):
        raise SystemExit("--out must end in .safetensors")
    model, tokenizer = _load(args)
    windows = wikitext_windows(tokenizer, args.windows, args.prompt_len + args.continuation)
    data = measure_routing_data(model, windows, args.prompt_len)
    fit = fit_linear_router if args.kind == "linear" else fit_influence_router
    router = fit(data, args.fraction, Adapter(model))
    router.save(args.out)
    print(f"wrote {args.kind} router for layers {list(router.layers)} (target skip fraction {args.fraction}) "
          f"to {args.out}")
    return 0


def cmd_bench_skip(args) -> int:
    from .bench import output, skip
    from .skipping.profile import LayerProfile

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load(args)
    profile = LayerProfile.load(args.profile) if args.profile else None
    report = skip.run(model, tokenizer, calib_windows=args.calib_windows, eval_windows=args.eval_windows,
                      repeats=args.repeats, steps=args.steps, new_tokens=args.new_tokens, profile=profile)
    print(skip.table(report))
    if args.json:
        path = output.write(report, args.json, plot=False)[0]
        skip.plot(report, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
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

    sk = bsub.add_parser("skip", help="layer skipping: static, per-request routing, self-speculative")
    model_args(sk)
    sk.add_argument("--json", help="write the report here (and a .png plot beside it)")
    sk.add_argument("--profile", help="reuse a layer profile from 'splice profile layers' (greedy for 40%%)")
    sk.add_argument("--calib-windows", type=int, default=4, help="128-token calibration windows")
    sk.add_argument("--eval-windows", type=int, default=16, help="128-token held-out evaluation windows")
    sk.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    sk.add_argument("--new-tokens", type=int, default=64, help="tokens generated per speculative run")
    sk.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    sk.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    sk.set_defaults(func=cmd_bench_skip)

    prof = sub.add_parser("profile", help="measure importance on calibration text")
    psub = prof.add_subparsers(dest="what", required=True)
    pl = psub.add_parser("layers", help="per-layer Block Influence, L2 change, removal KL and perplexity")
    model_args(pl)
    pl.add_argument("--json", required=True, help="write the profile here (and a .png plot beside it)")
    pl.add_argument("--windows", type=int, default=8, help="calibration windows from WikiText-2")
    pl.add_argument("--length", type=int, default=128, help="tokens per window")
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--layers", type=int, help="greedy search for this many layers to skip")
    budget.add_argument("--speedup", type=float, help="greedy search for the layers an ideal speedup needs")
    pl.add_argument("--candidates", type=int, default=16, help="greedy pool: the layers of lowest removal KL")
    pl.set_defaults(func=cmd_profile_layers)

    route = sub.add_parser("route", help="per-request layer routing")
    rsub = route.add_subparsers(dest="what", required=True)
    rt = rsub.add_parser("train", help="fit a router on WikiText-2 calibration text")
    model_args(rt)
    rt.add_argument("--kind", default="linear", choices=["linear", "influence"])
    rt.add_argument("--fraction", type=float, default=0.25, help="mean fraction of candidate layers to skip")
    rt.add_argument("--windows", type=int, default=32)
    rt.add_argument("--prompt-len", type=int, default=64)
    rt.add_argument("--continuation", type=int, default=32)
    rt.add_argument("--out", required=True, help="router file (.safetensors)")
    rt.set_defaults(func=cmd_route_train)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
