"""``splice quantize`` and ``splice export``."""

from __future__ import annotations

from .common import load, model_options, threads_option


def cmd_quantize(args) -> int:
    from pathlib import Path

    from ..quant.allocate import plan_for
    from ..quant.apply import quantize_model
    from ..quant.checkpoint import save_quantized
    from ..quant.gptq import GPTQSettings
    from ..tools.calibration_text import evaluate, log_probs, wikitext_windows
    from ..quant.sliderquant import SliderQuantSettings, check_start
    from ..tools.gptq_calibration import gptq_quantize_model
    from ..tools.quant_sensitivity import reuse_or_measure
    from ..tools.sliderquant_calibration import sliderquant_model

    if Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")
    if args.method != "measured" and len(args.group_sizes) != 1:
        raise SystemExit(f"--method {args.method} uses one group size; only measured chooses among several")
    calibrated = args.quantizer in ("gptq", "sliderquant")
    try:  # settings are checked before the model loads
        gptq = GPTQSettings(args.damp, args.act_order, args.grid, clip=args.clip) if calibrated else None
        given = {k: getattr(args, k) for k in ("epochs", "rank", "init") if getattr(args, k) is not None}
        slider = SliderQuantSettings(**given) if args.quantizer == "sliderquant" else None
        if slider:
            check_start(slider, gptq.grid)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    model, tokenizer = load(args)
    calibration = None
    if calibrated:  # calibration text after the sensitivity and held-out windows, which it must not see
        seen = (args.windows + args.eval_windows) * args.length
        calibration = wikitext_windows(tokenizer, args.calibration_windows, args.calibration_length,
                                       offset=-(-seen // args.calibration_length))
    measurements = None
    if args.method in ("measured", "lim", "zd"):
        windows = wikitext_windows(tokenizer, args.windows, args.length)
        widths = args.widths if args.method == "measured" else ()
        # calibrated quantizers' costs: each unit GPTQ-quantized alone, its Hessian on the calibration windows
        cost_gptq = {"gptq": gptq, "hessian_windows": calibration} if gptq else {}
        try:
            measurements, reused = reuse_or_measure(args.measurements, model, windows, widths, args.group_sizes,
                                                    "gptq" if gptq else args.quantizer, **cost_gptq)
        except ValueError as exc:
            raise SystemExit(f"{args.measurements or 'measuring'}: {exc}") from exc
        if args.measurements:
            print(f"{'reusing measurements from' if reused else 'wrote'} {args.measurements}")
    plan = plan_for(model, args.method, args.bits, measurements, args.group_sizes[0], args.widths, args.seed,
                    args.group_sizes)
    evals = reference = full_ppl = None
    if args.eval_windows:
        evals = wikitext_windows(tokenizer, args.eval_windows, args.length, offset=args.windows)
        reference, full_ppl = log_probs(model, evals), evaluate(model, evals)[0]
    if slider:
        report = sliderquant_model(model, plan, calibration, slider, gptq=gptq)
    elif gptq:
        report = gptq_quantize_model(model, plan, calibration, gptq)
    else:
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
    from ..quant.compressed_tensors_export import export_compressed_tensors

    out = export_compressed_tensors(args.source, args.to, overwrite=args.overwrite)
    print(f"wrote {out} (compressed-tensors pack-quantized; load it with vllm.LLM({str(out)!r}))")
    return 0


def add_commands(sub) -> None:
    qz = sub.add_parser("quantize", parents=[model_options(), threads_option()],
                        help="mixed-precision quantization under a bits-per-weight budget")
    qz.add_argument("--bits", type=float, required=True, help="average bits per weight (scales included), e.g. 3.5")
    qz.add_argument("--method", default="measured", choices=["measured", "lim", "zd", "random", "uniform"])
    qz.add_argument("--out", required=True, help="checkpoint directory to write")
    qz.add_argument("--overwrite", action="store_true")
    qz.add_argument("--measurements", help="measurement JSON: reused when it exists (refused unless made with the "
                    "same calibration windows and, for measured, quantizer, widths and group sizes), else "
                    "written there")
    qz.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn", "rtn_sym", "rtn_int", "gptq", "sliderquant"],
                    help="gptq, sliderquant: calibrated on WikiText-2 windows after the held-out ones; --method "
                    "measured then allocates with costs measured by GPTQ-quantizing each unit alone")
    qz.add_argument("--calibration-windows", type=int, default=16, help="gptq, sliderquant: calibration windows")
    qz.add_argument("--calibration-length", type=int, default=512,
                    help="gptq, sliderquant: tokens per calibration window")
    qz.add_argument("--epochs", type=int, help="sliderquant: passes over the calibration windows per window of "
                    "layers and rate (default: SliderQuantSettings')")
    qz.add_argument("--rank", type=int, help="sliderquant: LoRA rank (default: SliderQuantSettings')")
    qz.add_argument("--init", choices=["minmax", "clip", "gptq"],
                    help="sliderquant: where the clipping starts (default: clip, the squared-error range search; "
                    "gptq: from a GPTQ pass, integer --grid only)")
    qz.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    qz.add_argument("--grid", default="rtn_int", choices=["rtn_int", "rtn_sym", "rtn"],
                    help="gptq (and sliderquant's lm_head and costs): integer zero points (rtn_int, exportable), symmetric (rtn_sym, exportable) or "
                    "float min-max zero points (rtn: not exportable)")
    qz.add_argument("--clip", action="store_true",
                    help="gptq: shrink each group's range to the factor with the least squared error (outliers clipped)")
    qz.add_argument("--damp", type=float, default=0.01, help="gptq: dampening, a fraction of the mean Hessian diagonal")
    qz.add_argument("--group-sizes", type=int, nargs="+", default=[64], choices=[32, 64, 128],
                    help="group sizes to choose among (measured; the other methods take one)")
    qz.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 8], help="widths to choose from (16: dense)")
    qz.add_argument("--windows", type=int, default=2, help="calibration windows from WikiText-2")
    qz.add_argument("--length", type=int, default=128, help="tokens per window")
    qz.add_argument("--eval-windows", type=int, default=4, help="held-out windows for perplexity (0: none)")
    qz.add_argument("--seed", type=int, default=0, help="seed of --method random")
    qz.set_defaults(func=cmd_quantize)

    exp = sub.add_parser("export", help="convert a quantized checkpoint to compressed-tensors (vLLM)")
    exp.add_argument("--from", dest="source", required=True, help="checkpoint directory from 'splice quantize'")
    exp.add_argument("--to", required=True, help="Hugging Face directory to write (pack-quantized)")
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=cmd_export)
