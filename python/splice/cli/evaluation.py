"""``splice eval steer``: what steering does to generated text (concept, fluency, relevance);
``splice eval lfd``: context vs memory answers with and without Layer Fused Decoding."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .common import load, model_options, threads_option


def cmd_eval_steer(args) -> int:
    from ..bench.output import provenance
    from ..tools import steer_eval, steer_eval_report
    from ..utils.atomic import write_atomic

    unknown = [m for m in args.methods if m not in steer_eval.METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {sorted(steer_eval.METHODS)}")
    model, tokenizer = load(args)
    start = time.perf_counter()
    report = steer_eval.evaluate(model, tokenizer, methods=args.methods, scales=args.scales, map_scales=args.map_scales,
                                 instructions=args.instructions, max_new_tokens=args.max_new_tokens,
                                 concept=args.concept, fluency_budget=args.fluency_budget,
                                 probe_layer=args.probe_layer, condition_prompts=args.condition_prompts)
    report["seconds"] = time.perf_counter() - start
    report.update(provenance())
    print(steer_eval_report.table(report))
    print(f"took {report['seconds']:.0f} s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(report, indent=2))
        print(f"wrote {path}")
        steer_eval_report.plot(report, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return 0


def layer_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def cmd_eval_lfd(args) -> int:
    from ..bench.output import provenance, write
    from ..longcontext.layer_fused import LayerFusedDecoding
    from ..tools import lfd_eval
    from ..tools.knowledge_conflict import load_facts

    try:
        specs = [LayerFusedDecoding(layer, weight, args.select) for layer in args.layers for weight in args.weights]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model, tokenizer = load(args)
    report = lfd_eval.evaluate(model, tokenizer, specs, facts=load_facts(args.facts) if args.facts else None,
                               seed=args.seed)
    report.update(provenance())
    print(lfd_eval.table(report))
    if args.json:
        print(f"wrote {write(report, args.json)}")
    return 0


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help="evaluations of interventions")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    st = esub.add_parser("steer", parents=[model_options(), threads_option()],
                         help="AxBench-style: concept score, perplexity, repetition and relevance per method and scale")
    st.add_argument("--json", help="write the report here (and a .png plot beside it)")
    st.add_argument("--methods", nargs="+",
                    default=["mean_diff", "pca", "conditional", "lineas", "loreft", "gact", "controller"],
                    help="registered methods (default: all seven)")
    st.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8],
                    help="steering scales (0, the unsteered model, is always included)")
    st.add_argument("--map-scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0],
                    help="scales t of the learned maps (lineas, loreft): u + t*delta(u), 1 the trained map")
    st.add_argument("--instructions", type=int, default=16, help="held-out instructions (the first N)")
    st.add_argument("--max-new-tokens", type=int, default=32)
    st.add_argument("--concept", default="happy_probe",
                    help="concept probe data: a built-in prompt set or a JSON file with positive and negative lists")
    st.add_argument("--fluency-budget", type=float, default=1.5,
                    help="concept at equal fluency: the best scale with perplexity at most this × unsteered")
    st.add_argument("--probe-layer", type=int, default=15, help="layer whose input the concept probe reads")
    st.add_argument("--condition-prompts", type=int, default=None,
                    help="held-out condition prompts generated from for conditional methods (default: all)")
    st.set_defaults(func=cmd_eval_steer)
    lf = esub.add_parser("lfd", parents=[model_options(), threads_option()],
                         help="Layer Fused Decoding on the knowledge-conflict facts: share of answers following the "
                              "passage, with and without LFD")
    lf.add_argument("--layers", type=layer_arg, nargs="+", default=["auto"],
                    help="fused layers: indices and/or 'auto' (the lowest-IKS layer of the latter half)")
    lf.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="fusion weights w")
    lf.add_argument("--select", choices=["step", "prompt"], default="step", help="when 'auto' chooses its layer")
    lf.add_argument("--facts", help="a facts JSON file (default: the 58 built-in facts)")
    lf.add_argument("--seed", type=int, default=0, help="seed of the contradicting answers' pairing")
    lf.add_argument("--json", help="write the report here")
    lf.set_defaults(func=cmd_eval_lfd)
