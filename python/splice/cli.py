"""The ``splice`` command line: ``demo``, ``extract``, ``profile layers|heads``, ``route train``,
``bench steer|skip|quant|attention|serve``, ``quantize``, ``export``, ``serve``."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(args):
    """The model and tokenizer ``args`` name, after applying ``--threads`` where the command has it."""
    from .models.loader import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
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
    from .tools.calibration_text import wikitext_windows
    from .tools.layer_profile import layers_for_budget, plot_profile, profile_layers

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


def cmd_profile_heads(args) -> int:
    from .adapters.architecture import Adapter
    from .tools.passkey import passkey_set
    from .tools.calibration_text import wikitext_windows
    from .hybrid.head_map import HeadMap
    from .tools.head_profile import head_scores, interleave, plot_head_map, streaming_deltas

    model, tokenizer = _load(args)
    if args.merge:
        merge = HeadMap.load(args.merge)
        merge.validate_for(Adapter(model))
        if merge.scores is None:
            raise SystemExit(f"{args.merge} holds no head scores to merge")
    sequences = []
    for context in args.context:
        for task in passkey_set(tokenizer, context, args.passkeys):
            answer = tokenizer(" " + task.answer, return_tensors="pt", add_special_tokens=False).input_ids
            sequences.append((torch.cat([task.ids, answer], 1), answer.shape[1]))
    longest = max(args.context)
    skip = -(-8192 // longest)  # past the first 8192 tokens: 'splice bench attention' scores perplexity there
    for window in wikitext_windows(tokenizer, args.windows, longest, offset=skip):
        sequences.append((window[None], longest // 2))
    if args.method == "delta":
        scores = streaming_deltas(model, [ids for ids, _ in sequences], args.sinks, args.window, args.stride)
    else:
        scores = head_scores(model, sequences, args.sinks, args.window)
    if args.merge:
        scores = interleave(scores, merge.scores)
    head_map = HeadMap.from_scores(scores, args.full_fraction, args.sinks, args.window, Adapter(model).name)
    path = head_map.save(args.json)
    plot_head_map(head_map, path.with_suffix(".png"))
    print(f"{head_map.full_fraction:.0%} of KV heads keep full attention; wrote {path} and {path.with_suffix('.png')}")
    return 0


def cmd_route_train(args) -> int:
    from .adapters.architecture import Adapter
    from .tools.calibration_text import wikitext_windows
    from .tools.router_training import fit_influence_router, fit_linear_router, measure_routing_data

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


def _report(bench, report: dict, json_path) -> None:
    """Print ``bench.table(report)``; with ``json_path``, write the JSON and ``bench.plot`` beside it."""
    from .bench import output

    print(bench.table(report))
    if json_path:
        path = output.write(report, json_path, plot=False)[0]
        bench.plot(report, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")


def cmd_bench_skip(args) -> int:
    from .bench import skip
    from .tools.layer_profile import LayerProfile

    model, tokenizer = _load(args)
    profile = LayerProfile.load(args.profile) if args.profile else None
    report = skip.run(model, tokenizer, calib_windows=args.calib_windows, eval_windows=args.eval_windows,
                      repeats=args.repeats, steps=args.steps, new_tokens=args.new_tokens, profile=profile)
    _report(skip, report, args.json)
    return 0


def cmd_bench_quant(args) -> int:
    from .bench import quant

    model, tokenizer = _load(args)
    report = quant.run(model, tokenizer, calib_windows=args.calib_windows, eval_windows=args.eval_windows,
                       eval_length=args.eval_length, steps=args.steps, repeats=args.repeats, seeds=args.seeds,
                       measurements_path=args.measurements)
    _report(quant, report, args.json)
    return 0


def cmd_bench_attention(args) -> int:
    from .bench import attention
    from .hybrid.head_map import HeadMap

    model, tokenizer = _load(args)
    report = attention.run(model, tokenizer, HeadMap.load(args.heads), contexts=args.contexts, samples=args.samples,
                           ppl_windows=args.ppl_windows, ppl_length=args.ppl_length, steps=args.steps,
                           repeats=args.repeats)
    _report(attention, report, args.json)
    return 0


def cmd_quantize(args) -> int:
    from pathlib import Path

    from .tools.calibration_text import evaluate, log_probs, wikitext_windows
    from .quant.allocate import plan_for
    from .quant.apply import quantize_model
    from .quant.checkpoint import save_quantized
    from .tools.quant_sensitivity import Measurements, measure

    if Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")
    if args.method != "measured" and len(args.group_sizes) != 1:
        raise SystemExit(f"--method {args.method} uses one group size; only measured chooses among several")
    model, tokenizer = _load(args)
    measurements = None
    if args.method in ("measured", "lim", "zd"):
        windows = wikitext_windows(tokenizer, args.windows, args.length)
        widths = args.widths if args.method == "measured" else ()
        if args.measurements and Path(args.measurements).is_file():
            kl_used = args.method == "measured"  # lim and zd read no KL: quantizer and formats do not matter
            try:
                measurements = Measurements.load(args.measurements)
                measurements.check_reuse(model, windows,
                                         *((args.quantizer, widths, args.group_sizes) if kl_used else ()))
            except ValueError as exc:
                raise SystemExit(f"{args.measurements}: {exc}") from exc
            print(f"reusing measurements from {args.measurements}")
        else:
            measurements = measure(model, windows, widths, args.group_sizes, args.quantizer)
            if args.measurements:
                print(f"wrote {measurements.save(args.measurements)}")
    plan = plan_for(model, args.method, args.bits, measurements, args.group_sizes[0], args.widths, args.seed,
                    args.group_sizes)
    evals = reference = full_ppl = None
    if args.eval_windows:
        evals = wikitext_windows(tokenizer, args.eval_windows, args.length, offset=args.windows)
        reference, full_ppl = log_probs(model, evals), evaluate(model, evals)[0]
    report = quantize_model(model, plan, args.quantizer)
    print(f"plan ({args.method}, {args.quantizer}): {plan.summary()}")
    print(report)
    if evals is not None:
        ppl, kl = evaluate(model, evals, reference)
        print(f"WikiText-2 perplexity on {evals.numel()} held-out tokens: {full_ppl:.3f} (unquantized) -> "
              f"{ppl:.3f} (quantized); KL to the unquantized model {kl:.4f}")
    print(f"wrote {save_quantized(model, plan, args.out, tokenizer, overwrite=args.overwrite)} "
          "(load it with splice.load_quantized)")
    return 0


def cmd_export(args) -> int:
    from .quant.compressed_tensors_export import export_compressed_tensors

    out = export_compressed_tensors(args.source, args.to, overwrite=args.overwrite)
    print(f"wrote {out} (compressed-tensors pack-quantized; load it with vllm.LLM({str(out)!r}))")
    return 0


def cmd_serve(args) -> int:
    import os

    from .serving.launch import command, server_env

    cmd = command(args.recipe, args.vllm_args)
    print("splice: " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, server_env())


def cmd_bench_serve(args) -> int:
    from .bench import output
    from .bench.serve import run, table

    report = run(args.model, requests=args.requests, max_tokens=args.max_tokens, repeats=args.repeats,
                 port=args.port, vllm_args=args.vllm_args)
    print(table(report))
    if args.json:
        print(f"wrote {output.write(report, args.json, plot=False)[0]}")
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

    bq = bsub.add_parser("quant", help="quantization: perplexity, bytes and decode speed per width and method")
    model_args(bq)
    bq.add_argument("--json", help="write the report here (and a .png plot beside it)")
    bq.add_argument("--measurements", help="measurement JSON: reused when it exists (refused unless made on the same "
                    "calibration windows, quantizer hqq, widths 2 3 4, group sizes 32 64 128), else written there")
    bq.add_argument("--calib-windows", type=int, default=2, help="128-token calibration windows")
    bq.add_argument("--eval-windows", type=int, default=4, help="held-out evaluation windows")
    bq.add_argument("--eval-length", type=int, default=512, help="tokens per evaluation window")
    bq.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    bq.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    bq.add_argument("--seeds", type=int, default=3, help="seeds of the random allocation (median perplexity)")
    bq.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    bq.set_defaults(func=cmd_bench_quant)

    ba = bsub.add_parser("attention", help="hybrid attention: pass-key, perplexity, KV bytes and speed at long context")
    model_args(ba)
    ba.add_argument("--json", help="write the report here (and a .png plot beside it)")
    ba.add_argument("--heads", required=True, help="head map with scores from 'splice profile heads'")
    ba.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192], help="pass-key context lengths")
    ba.add_argument("--samples", type=int, default=3, help="pass-key prompts per context")
    ba.add_argument("--ppl-windows", type=int, default=2, help="WikiText-2 windows for perplexity")
    ba.add_argument("--ppl-length", type=int, default=2048, help="tokens per perplexity window")
    ba.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    ba.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    ba.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ba.set_defaults(func=cmd_bench_attention)

    bs = bsub.add_parser("serve", help="vLLM serving throughput: unsteered, one vector everywhere, 16 vectors")
    bs.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    bs.add_argument("--json", help="write the report here")
    bs.add_argument("--requests", type=int, default=32, help="concurrent requests per timed run")
    bs.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    bs.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    bs.add_argument("--port", type=int, default=8765)
    bs.set_defaults(func=cmd_bench_serve, vllm_args=[])  # other arguments go to the vLLM server

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

    ph = psub.add_parser("heads", help="score every KV head's need for full attention; write a head map")
    model_args(ph)
    ph.add_argument("--json", required=True, help="write the head map here (and a .png heat map beside it)")
    ph.add_argument("--full-fraction", type=float, default=0.25, help="fraction of KV heads kept full")
    ph.add_argument("--sinks", type=int, default=4)
    ph.add_argument("--window", type=int, default=256)
    ph.add_argument("--method", choices=("delta", "kl"), default="delta",
                    help="delta: residual change per head, one pass per sequence (scores at long context); "
                         "kl: output KL, one pass per head and sequence")
    ph.add_argument("--stride", type=int, default=32, help="delta: score every stride-th query position")
    ph.add_argument("--merge", help="a scored head map (e.g. from --method kl): rank heads round-robin over "
                                    "its scores and this run's")
    ph.add_argument("--context", type=int, nargs="+", default=[8192],
                    help="pass-key prompt lengths (WikiText-2 windows take the longest)")
    ph.add_argument("--passkeys", type=int, default=2, help="pass-key prompts per context")
    ph.add_argument("--windows", type=int, default=1, help="WikiText-2 windows")
    ph.set_defaults(func=cmd_profile_heads)

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

    qz = sub.add_parser("quantize", help="mixed-precision quantization under a bits-per-weight budget")
    model_args(qz)
    qz.add_argument("--bits", type=float, required=True, help="average bits per weight (scales included), e.g. 3.5")
    qz.add_argument("--method", default="measured", choices=["measured", "lim", "zd", "random", "uniform"])
    qz.add_argument("--out", required=True, help="checkpoint directory to write")
    qz.add_argument("--overwrite", action="store_true")
    qz.add_argument("--measurements", help="measurement JSON: reused when it exists (refused unless made with the "
                    "same calibration windows and, for measured, quantizer, widths and group sizes), else "
                    "written there")
    qz.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn", "rtn_sym", "rtn_int"])
    qz.add_argument("--group-sizes", type=int, nargs="+", default=[64], choices=[32, 64, 128],
                    help="group sizes to choose among (measured; the other methods take one)")
    qz.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 8], help="widths to choose from (16: dense)")
    qz.add_argument("--windows", type=int, default=2, help="calibration windows from WikiText-2")
    qz.add_argument("--length", type=int, default=128, help="tokens per window")
    qz.add_argument("--eval-windows", type=int, default=4, help="held-out windows for perplexity (0: none)")
    qz.add_argument("--seed", type=int, default=0, help="seed of --method random")
    qz.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    qz.set_defaults(func=cmd_quantize)

    exp = sub.add_parser("export", help="convert a quantized checkpoint to compressed-tensors (vLLM)")
    exp.add_argument("--from", dest="source", required=True, help="checkpoint directory from 'splice quantize'")
    exp.add_argument("--to", required=True, help="Hugging Face directory to write (pack-quantized)")
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=cmd_export)
    sv = sub.add_parser("serve", help="serve a model behind vLLM with a recipe (per-request steering)")
    sv.add_argument("--recipe", required=True, help="recipe file (.yaml/.json) whose vectors requests may choose")
    sv.set_defaults(func=cmd_serve, vllm_args=[])  # every other argument goes to vLLM (--model DIR, --port, ...)
    return p


def main(argv=None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and not hasattr(args, "vllm_args"):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.vllm_args = [a for a in extra if a != "--"]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
