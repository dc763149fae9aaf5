"""``splice demo``, ``extract``, ``condition fit``, ``train lineas|gact|controller`` and ``search heads``
(``search attention`` is in :mod:`.profiling`)."""

from __future__ import annotations

import json

from .common import load, model_options, report_option, threads_option
from .profiling import add_search_attention, add_search_reuse


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


def _finish(args, report: dict, source: str, summary: str, **extra) -> int:
    """Record where the inputs came from, write the JSON report if asked, print the summary."""
    from ..utils.atomic import write_atomic

    report.update(source=source, out=args.out, **extra)
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2))
    print(f"{summary}; wrote {args.out}")
    return 0


def _model_name(model) -> str | None:
    return getattr(model.config, "_name_or_path", None)


def cmd_condition_fit(args) -> int:
    from ..steering.files import save_intervention
    from ..tools.condition_fit import fit_condition
    from ..vectors.prompt_sets import as_chat, builtin_prompt_set, load_prompt_set, require

    prompts = load_prompt_set(args.prompts) if args.prompts else builtin_prompt_set(args.builtin)
    require(prompts, "positive", "negative", source=args.prompts or args.builtin)
    model, tokenizer = load(args)
    positive, negative = prompts["positive"], prompts["negative"]
    if not args.raw:
        positive, negative = as_chat(tokenizer, positive), as_chat(tokenizer, negative)
    condition, report = fit_condition(model, tokenizer, positive, negative, layers=args.layers, reduce=args.reduce,
                                      held_out=args.held_out, seed=args.seed)
    save_intervention(condition, args.out, model=_model_name(model))
    held = report["held_out"]
    return _finish(args, report, args.prompts or f"builtin:{args.builtin}",
                   f"condition at layer {report['layer']} ({report['compare']} {report['threshold']:.4f}): held-out "
                   f"F1 {held['f1']:.3f}, TPR {held['tpr']:.3f}, FPR {held['fpr']:.3f}", chat=not args.raw)


def cmd_train_lineas(args) -> int:
    from ..steering.files import save_intervention
    from ..tools.lineas import train_lineas
    from ..vectors.extract import builtin_pairs, load_pairs

    target, source = load_pairs(args.pairs) if args.pairs else builtin_pairs(args.builtin)
    model, tokenizer = load(args)
    learned, report = train_lineas(model, tokenizer, source, target, layers=args.layers, steps=args.steps, lr=args.lr,
                                   sparsity=args.sparsity, form=args.form, rank=args.rank, seed=args.seed)
    save_intervention(learned, args.out, model=_model_name(model))
    return _finish(args, report, args.pairs or f"builtin:{args.builtin}",
                   f"LinEAS ({args.form}): W2 {report['w2_first']:.4f} -> {report['w2_last']:.4f} over {args.steps} steps; "
                   f"{len(report['kept_layers'])} of {len(report['layers'])} layers kept")


def cmd_train_gact(args) -> int:
    from ..steering.files import save_bank
    from ..tools.gact import fit_gact
    from ..vectors.extract import builtin_pairs, load_pairs

    positive, negative = load_pairs(args.pairs) if args.pairs else builtin_pairs(args.builtin)
    model, tokenizer = load(args)
    bank, probe, report = fit_gact(model, tokenizer, positive, negative, clusters=args.clusters, layers=args.layers,
                                   seed=args.seed)
    save_bank(bank, probe, args.out, model=_model_name(model))
    return _finish(args, report, args.pairs or f"builtin:{args.builtin}",
                   f"G-ACT: {args.clusters} vectors (pairs per cluster {report['cluster_sizes']}), probe at layer "
                   f"{report['probe_layer']} with held-out accuracy {report['probe_held_out_accuracy']:.3f} "
                   f"(majority class {report['chance']:.3f})")


def cmd_train_controller(args) -> int:
    from ..steering.files import save_controlled
    from ..tools.controller_training import train_controller
    from ..vectors.extract import builtin_pairs, extract_vectors
    from ..vectors.io import load_vectors
    from ..vectors.prompt_sets import as_chat, builtin_prompt_set, load_prompt_set, require

    prompts = load_prompt_set(args.prompts) if args.prompts else builtin_prompt_set(args.builtin)
    require(prompts, "positive", "negative", source=args.prompts or args.builtin)
    model, tokenizer = load(args)
    vector = load_vectors(args.vector) if args.vector else extract_vectors(model, tokenizer, *builtin_pairs("happy_sad"))
    steer_prompts, keep_prompts = as_chat(tokenizer, prompts["positive"]), as_chat(tokenizer, prompts["negative"])
    _, steer, report = train_controller(model, tokenizer, steer_prompts, keep_prompts, vector, args.layers, args.scale,
                                        args.read_layer, steps=args.steps, lr=args.lr, seed=args.seed)
    save_controlled(steer, args.out, model=_model_name(model))
    steer_gate, keep_gate = (sum(g) / len(g) for g in (report["mean_gate_steer"], report["mean_gate_keep"]))
    return _finish(args, report, args.prompts or f"builtin:{args.builtin}",
                   f"controller: loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}; mean gate on steer "
                   f"prompts {steer_gate:.3f}, on keep prompts {keep_gate:.3f}",
                   vector=args.vector or "builtin:happy_sad")


def cmd_search_heads(args) -> int:
    from ..recipe import Recipe
    from ..tools.head_search import search_heads
    from ..tools.knowledge_conflict import builtin_facts, load_facts, make_conflicts

    if not args.out.endswith((".yaml", ".yml", ".json")):
        raise SystemExit("--out must end in .yaml, .yml or .json (a recipe)")
    facts = load_facts(args.facts) if args.facts else builtin_facts()
    model, tokenizer = load(args)
    conflicts = make_conflicts(tokenizer, facts, seed=args.seed)
    pruned, report = search_heads(model, tokenizer, conflicts, toward=args.toward, k=args.k,
                                  candidates=args.candidates, retain=args.retain, held_out=args.held_out,
                                  known_only=not args.all_facts, seed=args.seed)
    Recipe(steers={pruned.name: pruned}, default=[(pruned.name, pruned.scale)]).save(args.out)
    before, after = report["held_out"]["unpatched"], report["held_out"]["pruned"]
    return _finish(args, report, args.facts or "builtin:facts",
                   f"PH3 toward {args.toward}: pruned {len(report['pruned_heads'])} heads "
                   f"{report['pruned_heads']}; held-out follows {args.toward} "
                   f"{before['follows_' + args.toward]:.3f} -> {after['follows_' + args.toward]:.3f}, closed-book "
                   f"accuracy {before['closed_book_accuracy']:.3f} -> {after['closed_book_accuracy']:.3f}")


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

    cond = sub.add_parser("condition", help="conditions for steering (CAST)")
    csub = cond.add_subparsers(dest="condition_command", required=True)
    fit = csub.add_parser("fit", parents=[model_options(), report_option(plot=False)],
                          help="fit a CAST condition on two prompt sets (layer and threshold by F1 on prompts the "
                               "direction did not see)")
    src = fit.add_mutually_exclusive_group()
    src.add_argument("--prompts", help='JSON file {"positive": [...], "negative": [...]}')
    src.add_argument("--builtin", default="cooking", help="a built-in prompt set (default: cooking)")
    fit.add_argument("--layers", type=int, nargs="+", default=None, help="candidate layers (default: all but 0)")
    fit.add_argument("--reduce", default="mean", choices=["mean", "last"], help="pool the prompt's tokens")
    fit.add_argument("--held-out", type=float, default=1 / 3, help="fraction of each set kept for the report")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--raw", action="store_true", help="read the prompts as given, not wrapped in the chat template")
    fit.add_argument("--out", required=True, help="output condition file (.safetensors)")
    fit.set_defaults(func=cmd_condition_fit)

    train = sub.add_parser("train", help="learn interventions from the model's activations")
    tsub = train.add_subparsers(dest="train_command", required=True)
    lin = tsub.add_parser("lineas", parents=[model_options(), report_option(plot=False), threads_option()],
                          help="LinEAS: per-layer affine (or LoReFT-form low-rank) maps trained end to end "
                               "(negative prompts -> positive)")
    src = lin.add_mutually_exclusive_group()
    src.add_argument("--pairs", help='JSON file of [{"positive": ..., "negative": ...}, ...] (used unpaired)')
    src.add_argument("--builtin", default="happy_sad", help="a built-in pair set (default: happy_sad)")
    lin.add_argument("--layers", type=int, nargs="+", default=None, help="layers to map (default: all)")
    lin.add_argument("--steps", type=int, default=100)
    lin.add_argument("--lr", type=float, default=5e-3)
    lin.add_argument("--sparsity", type=float, default=0.0, help="group-lasso weight that switches layers off")
    lin.add_argument("--form", choices=("affine", "lowrank"), default="affine",
                     help="affine: u <- a*u + b (LinEAS); lowrank: u <- u + B(A^T u - c) (LoReFT's form)")
    lin.add_argument("--rank", type=int, default=8, help="rank of the lowrank form (1..16)")
    lin.add_argument("--seed", type=int, default=0)
    lin.add_argument("--out", required=True, help="output map file (.safetensors)")
    lin.set_defaults(func=cmd_train_lineas)

    gact = tsub.add_parser("gact", parents=[model_options(), report_option(plot=False), threads_option()],
                           help="G-ACT: cluster per-pair differences into a vector bank and fit the probe that picks one")
    src = gact.add_mutually_exclusive_group()
    src.add_argument("--pairs", help='JSON file of [{"positive": ..., "negative": ...}, ...]')
    src.add_argument("--builtin", default="happy_sad", help="a built-in pair set (default: happy_sad)")
    gact.add_argument("--clusters", type=int, default=2)
    gact.add_argument("--layers", type=int, nargs="+", default=list(range(12, 19)), help="steered layers")
    gact.add_argument("--seed", type=int, default=0)
    gact.add_argument("--out", required=True, help="output bank file (.safetensors)")
    gact.set_defaults(func=cmd_train_gact)

    ctl = tsub.add_parser("controller", parents=[model_options(), report_option(plot=False), threads_option()],
                          help="Guiding Giants: a controller that scales a vector per request and layer")
    src = ctl.add_mutually_exclusive_group()
    src.add_argument("--prompts", help='JSON {"positive": [steer these], "negative": [leave these]}')
    src.add_argument("--builtin", default="cooking", help="a built-in prompt set (default: cooking)")
    ctl.add_argument("--vector", help="vector file to control (default: happy_sad mean difference)")
    ctl.add_argument("--layers", type=int, nargs="+", default=list(range(12, 19)))
    ctl.add_argument("--scale", type=float, default=0.4)
    ctl.add_argument("--read-layer", type=int, default=6, help="the layer whose input the controller reads")
    ctl.add_argument("--steps", type=int, default=40)
    ctl.add_argument("--lr", type=float, default=1e-2)
    ctl.add_argument("--seed", type=int, default=0)
    ctl.add_argument("--out", required=True, help="output file (.safetensors): the vector and its controller")
    ctl.set_defaults(func=cmd_train_controller)

    search = sub.add_parser("search", help="measured searches for interventions")
    ssub = search.add_subparsers(dest="search_command", required=True)
    heads = ssub.add_parser("heads", parents=[model_options(), report_option(plot=False), threads_option()],
                            help="PH3: the attention heads to prune so the model answers from memory (or context) "
                                 "when a passage contradicts what it knows; writes a recipe")
    heads.add_argument("--facts", help='JSON {"facts": [{"relation", "cloze", "memory"}, ...]} (default: built-in)')
    heads.add_argument("--toward", choices=("memory", "context"), default="memory")
    heads.add_argument("--k", type=int, default=8, help="most heads to prune")
    heads.add_argument("--candidates", type=int, default=24, help="heads measured after gradient screening")
    heads.add_argument("--retain", type=float, default=1.0,
                       help="weight of the closed-book log-probability kept in the objective")
    heads.add_argument("--held-out", type=float, default=0.34, help="fraction of conflicts kept for the report")
    heads.add_argument("--all-facts", action="store_true",
                       help="keep facts the model does not answer closed-book (default: known facts only)")
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--out", required=True, help="output recipe (.yaml or .json) that prunes the heads found")
    heads.set_defaults(func=cmd_search_heads)
    add_search_attention(ssub)
    add_search_reuse(ssub)
