"""``splice bench steer|skip|speculative|quant|attention|serve``: each writes a JSON report (and a plot)."""

from __future__ import annotations

from .common import load, model_options, report_option, threads_option, timing_options

CONTEXTS = (2048, 4096, 8192)


def _report(report_module, report: dict, json_path, plot: bool = True) -> None:
    """Print ``report_module.table(report)``; with ``json_path``, write the JSON and (with ``plot``, where
    the module draws one) ``report_module.plot`` beside it."""
    from ..bench import output

    print(report_module.table(report))
    if json_path:
        path = output.write(report, json_path)
        print(f"wrote {path}")
        if plot and hasattr(report_module, "plot"):
            report_module.plot(report, path.with_suffix(".png"))
            print(f"wrote {path.with_suffix('.png')}")


def cmd_bench_steer(args) -> int:
    from ..bench import steer, steer_report

    model, _ = load(args)
    report = steer.run(model, batches=tuple(args.batches), prompt_len=args.prompt_len, steps=args.steps,
                       repeats=args.repeats, compiled=args.compiled, profile=args.profile)
    print(f"backends: {report['backends']}")
    _report(steer_report, report, args.json, plot=not args.no_plot)
    return 0


def cmd_bench_skip(args) -> int:
    from ..bench import skip, skip_report
    from ..tools.layer_profile import LayerProfile

    model, tokenizer = load(args)
    profile = LayerProfile.load(args.profile) if args.profile else None
    report = skip.run(model, tokenizer, calib_windows=args.calib_windows, eval_windows=args.eval_windows,
                      repeats=args.repeats, steps=args.steps, profile=profile)
    _report(skip_report, report, args.json)
    return 0


def cmd_bench_speculative(args) -> int:
    from ..bench import speculative, speculative_report

    model, tokenizer = load(args)
    report = speculative.run(model, tokenizer, prompts=args.prompts, calib_prompts=args.calib_prompts,
                             new_tokens=args.new_tokens, repeats=args.repeats, workloads=args.workloads)
    _report(speculative_report, report, args.json)
    return 0


def cmd_bench_quant(args) -> int:
    from ..bench import quant, quant_report

    model, tokenizer = load(args)
    report = quant.run(model, tokenizer, calib_windows=args.calib_windows, eval_windows=args.eval_windows,
                       eval_length=args.eval_length, steps=args.steps, repeats=args.repeats, seeds=args.seeds,
                       measurements_path=args.measurements, decode_only=args.decode_only,
                       profile_decode=args.profile_decode, compiled=args.compiled,
                       llamacpp_gguf=args.llamacpp_gguf or _default_gguf(args), gptq=args.gptq,
                       gptq_measurements_path=args.gptq_measurements, sliderquant=args.sliderquant)
    _report(quant_report, report, args.json)
    return 0


def _default_gguf(args):
    """The bundled Q4_1 GGUF when the bench runs the default model (llama.cpp's row needs the same model)."""
    from ..models.loader import DEFAULT_MODEL, bundled_gguf

    return bundled_gguf() if args.model in (None, DEFAULT_MODEL) else None


def cmd_bench_attention(args) -> int:
    from ..bench import attention, attention_report
    from ..hybrid.head_map import HeadMap

    if args.method == "gemfilter":
        return _bench_gemfilter(args)
    if args.method == "layerboost":
        return _bench_layerboost(args)
    if args.method == "hylra":
        return _bench_hylra(args)
    if not args.heads:
        raise SystemExit("splice bench attention: --heads is required for --method hybrid")
    model, tokenizer = load(args)
    report = attention.run(model, tokenizer, HeadMap.load(args.heads), contexts=args.contexts or CONTEXTS,
                           samples=args.samples, ppl_windows=args.ppl_windows, ppl_length=args.ppl_length,
                           steps=args.steps, repeats=args.repeats)
    _report(attention_report, report, args.json)
    return 0


def _bench_gemfilter(args) -> int:
    from ..bench import gemfilter, gemfilter_report

    model, tokenizer = load(args)
    report = gemfilter.run(model, tokenizer, contexts=args.contexts or CONTEXTS, samples=args.samples,
                           keep=args.keep, layer=args.layer, calibration=args.calibration, steps=args.steps,
                           repeats=args.repeats)
    _report(gemfilter_report, report, args.json)
    return 0


def _bench_layerboost(args) -> int:
    from ..bench import layerboost, layerboost_report
    from ..hybrid.layer_policy import LayerPolicy

    if not args.policy:
        raise SystemExit("splice bench attention: --policy is required for --method layerboost")
    policy = LayerPolicy.load(args.policy)
    model, tokenizer = load(args)
    report = layerboost.run(model, tokenizer, policy, seeds=args.seeds, ppl_windows=args.ppl_windows,
                            ppl_length=args.ppl_length, contexts=args.contexts or (), samples=args.samples)
    _report(layerboost_report, report, args.json)
    return 0


def _bench_hylra(args) -> int:
    from ..bench import hylra, hylra_report
    from ..hybrid.reuse_policy import ReusePolicy

    if not args.reuse:
        raise SystemExit("splice bench attention: --reuse is required for --method hylra")
    policy = ReusePolicy.load(args.reuse)
    model, tokenizer = load(args)
    report = hylra.run(model, tokenizer, policy, contexts=args.contexts or CONTEXTS, samples=args.samples,
                       ppl_windows=args.ppl_windows, ppl_length=args.ppl_length, ppl_offset=args.ppl_offset,
                       steps=args.steps, repeats=args.repeats)
    _report(hylra_report, report, args.json)
    return 0


def cmd_bench_serve(args) -> int:
    from ..bench import serve, serve_report

    report = serve.run(args.model, requests=args.requests, max_tokens=args.max_tokens, repeats=args.repeats,
                       port=args.port, vllm_args=args.vllm_args)
    _report(serve_report, report, args.json)
    return 0


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="throughput benchmarks")
    bsub = bench.add_subparsers(dest="suite", required=True)
    report = report_option()
    st = bsub.add_parser("steer", parents=[model_options(), report, timing_options(32, 5)],
                         help="steering throughput vs unpatched and forward hooks")
    st.add_argument("--no-plot", action="store_true")
    st.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    st.add_argument("--prompt-len", type=int, default=64)
    st.add_argument("--compiled", action="store_true",
                    help="add splice.compile_decode rows, unpatched and steered (compiles for a few minutes)")
    st.add_argument("--profile", action="store_true",
                    help="also split a decode step of unpatched, steered and gated8 with the torch profiler")
    st.set_defaults(func=cmd_bench_steer)

    sk = bsub.add_parser("skip", parents=[model_options(), report, timing_options(32, 3)],
                         help="layer skipping: static and per-request routing")
    sk.add_argument("--profile", help="reuse a layer profile from 'splice profile layers' (greedy for 40%%)")
    sk.add_argument("--calib-windows", type=int, default=4, help="128-token calibration windows")
    sk.add_argument("--eval-windows", type=int, default=16, help="128-token held-out evaluation windows")
    sk.set_defaults(func=cmd_bench_skip)

    sp = bsub.add_parser("speculative", parents=[model_options(), report_option(plot=False), threads_option()],
                         help="speculative decoding (layer-skip drafts, prompt lookup) per workload vs greedy generate")
    sp.add_argument("--workloads", nargs="+", default=["continuation", "summary"], choices=["continuation", "summary"])
    sp.add_argument("--prompts", type=int, default=3, help="evaluation prompts per workload")
    sp.add_argument("--calib-prompts", type=int, default=2, help="prompts per workload the draft search times")
    sp.add_argument("--new-tokens", type=int, default=64, help="most tokens generated per prompt (EOS ends sooner)")
    sp.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    sp.set_defaults(func=cmd_bench_speculative)

    bq = bsub.add_parser("quant", parents=[model_options(), report, timing_options(32, 3)],
                         help="quantization: perplexity, bytes and decode speed per width and method")
    bq.add_argument("--measurements", help="measurement JSON: reused when it exists (refused unless made on the "
                    "same calibration windows, quantizer hqq, widths 2 3 4, group sizes 32 64 128), else written there")
    bq.add_argument("--calib-windows", type=int, default=2, help="128-token calibration windows")
    bq.add_argument("--eval-windows", type=int, default=4, help="held-out evaluation windows")
    bq.add_argument("--eval-length", type=int, default=512, help="tokens per evaluation window")
    bq.add_argument("--seeds", type=int, default=3, help="seeds of the random allocation (median perplexity)")
    bq.add_argument("--decode-only", action="store_true",
                    help="fp32, bf16 and uniform rows only: no sensitivity measurement, no mixed rows")
    bq.add_argument("--profile-decode", action="store_true",
                    help="also split a decode step of bf16 and 4-bit (batch 1 and 8) with the torch profiler")
    bq.add_argument("--compiled", action="store_true",
                    help="add the uniform 4-bit model decoded by splice.compile_decode (batch 1 and 8)")
    bq.add_argument("--llamacpp-gguf", help="GGUF for the llama.cpp row (default: the bundled Q4_1 file of the "
                    "default model); the row needs llama-cpp-python: make install-llamacpp")
    bq.add_argument("--gptq", action="store_true",
                    help="add GPTQ rows (uniform 3 and 4 bits, measured allocation at 3.5 and 4.25 with GPTQ costs) "
                    "and the HQQ 4-bit group-32 row (the model's own grid); quality only")
    bq.add_argument("--gptq-measurements", help="GPTQ cost JSON: reused when it exists (refused unless made the "
                    "same way), else written there")
    bq.add_argument("--sliderquant", action="store_true",
                    help="with --gptq: add SliderQuant rows (uniform 3 bits, measured allocation at 3.5 with GPTQ "
                    "costs); quality and calibration time")
    bq.set_defaults(func=cmd_bench_quant)

    ba = bsub.add_parser("attention", parents=[model_options(), report, timing_options(16, 3)],
                         help="hybrid attention: pass-key, perplexity, KV bytes and speed at long context")
    ba.add_argument("--method", choices=["hybrid", "gemfilter", "layerboost", "hylra"], default="hybrid",
                    help="hybrid: head maps (needs --heads); gemfilter: GemFilter against the unpatched model; "
                         "layerboost: a layer policy against random ones of the same cost (needs --policy; "
                         "quality only, nothing timed); hylra: layer reuse against the unpatched model (needs "
                         "--reuse)")
    ba.add_argument("--heads", help="head map with scores from 'splice profile heads' (--method hybrid)")
    ba.add_argument("--policy", help="layer policy from 'splice search attention' (--method layerboost)")
    ba.add_argument("--reuse", help="reuse policy from 'splice search reuse' (--method hylra)")
    ba.add_argument("--seeds", type=int, default=3, help="random policies of the same cost (--method layerboost)")
    ba.add_argument("--contexts", type=int, nargs="+",
                    help="pass-key context lengths (default: 2048 4096 8192; none for --method layerboost)")
    ba.add_argument("--keep", type=int, default=1024, help="tokens GemFilter keeps (--method gemfilter)")
    ba.add_argument("--layer", type=int, help="GemFilter's selection layer (default: chosen on calibration prompts)")
    ba.add_argument("--calibration", type=int, default=2,
                    help="pass-key prompts at the longest context that choose GemFilter's layer")
    ba.add_argument("--samples", type=int, default=3, help="pass-key prompts per context")
    ba.add_argument("--ppl-windows", type=int, default=2, help="WikiText-2 windows for perplexity")
    ba.add_argument("--ppl-length", type=int, default=2048, help="tokens per perplexity window")
    ba.add_argument("--ppl-offset", type=int,
                    help="first perplexity window, in windows of --ppl-length (--method hylra; default: the first "
                         "past the policy's calibration)")
    ba.set_defaults(func=cmd_bench_attention)

    bs = bsub.add_parser("serve", parents=[report_option(plot=False)],
                         help="vLLM serving throughput: plain vLLM, and the plugin unsteered, with one vector "
                              "everywhere and with 16 vectors")
    bs.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    bs.add_argument("--requests", type=int, default=32, help="concurrent requests per timed run")
    bs.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    bs.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    bs.add_argument("--port", type=int, default=8765, help="the plugin's server (plain vLLM: port + 1)")
    bs.set_defaults(func=cmd_bench_serve, vllm_args=[])  # other arguments go to both vLLM servers
