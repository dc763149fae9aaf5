"""``splice profile layers|heads``, ``splice search attention`` and ``splice route train``: measurements
that later commands reuse."""

from __future__ import annotations

import torch

from .common import load, model_options, threads_option


def cmd_profile_layers(args) -> int:
    from ..tools.calibration_text import wikitext_windows
    from ..tools.layer_profile import layers_for_budget, plot_profile, profile_layers

    model, tokenizer = load(args)
    num_layers = model.config.num_hidden_layers
    greedy = layers_for_budget(num_layers, args.layers, args.speedup) if (args.layers or args.speedup) else 0
    windows = wikitext_windows(tokenizer, args.windows, args.length)
    profile = profile_layers(model, windows, greedy_layers=greedy, candidates=args.candidates)
    path = profile.save(args.json)
    plot = plot_profile(profile, path.with_suffix(".png"))
    order = sorted(range(num_layers), key=lambda l: profile.removal_kl[l])
    print(f"full perplexity {profile.full_ppl:.2f}; layers by removal KL (cheapest first): {order}")
    if greedy:
        print(f"greedy skip set ({greedy} layers): {sorted(profile.greedy_order)}; "
              f"joint KL {profile.greedy_kl[-1]:.4f}")
    print(f"wrote {path} and {plot}")
    return 0


def cmd_profile_heads(args) -> int:
    from ..adapters.architecture import Adapter
    from ..hybrid.head_map import HeadMap
    from ..tools.calibration_text import wikitext_windows
    from ..tools.head_profile import head_scores, interleave, plot_head_map, streaming_deltas
    from ..tools.passkey import passkey_set

    model, tokenizer = load(args)
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


def cmd_search_attention(args) -> int:
    from ..hybrid.layer_policy import LayerPolicy
    from ..tools.calibration_text import wikitext_windows
    from ..tools.layer_policy_search import search_policy

    if not args.out.endswith(".json"):
        raise SystemExit("--out must end in .json (a layer policy)")
    measured = None
    if args.reuse:
        earlier = LayerPolicy.load(args.reuse)
        try:
            measured, calib = earlier.report["sensitivity_kl"], earlier.report["calibration"]
        except (TypeError, KeyError):
            raise SystemExit(f"{args.reuse} holds no measured sensitivities") from None
        args.sinks, args.window, args.windows, args.length = (earlier.sinks, earlier.window, calib["windows"],
                                                              calib["length"])
    model, tokenizer = load(args)
    calibration = wikitext_windows(tokenizer, args.windows, args.length)
    held_out = (wikitext_windows(tokenizer, args.held_out, args.length, offset=args.windows)
                if args.held_out else None)
    policy = search_policy(model, calibration, args.budget, args.context, args.sinks, args.window, held_out,
                           measured=measured)
    path = policy.save(args.out)
    report = policy.report
    print(f"layers: window {list(policy.window_layers)}, none {list(policy.none_layers)}; cost "
          f"{report['cost_fraction']:.3f} of full attention at {args.context} tokens; summed calibration KL "
          f"{report['predicted_kl']:.4f}")
    if held_out is not None:
        check = report["held_out"]
        print(f"held-out perplexity {check['full_ppl']:.2f} -> {check['ppl']:.2f} (KL {check['kl']:.4f})")
    print(f"wrote {path}")
    return 0


def add_search_attention(ssub) -> None:
    """``splice search attention`` (under the ``search`` command)."""
    sa = ssub.add_parser("attention", parents=[model_options(), threads_option()],
                         help="LayerBoost: per layer full attention, a sliding window or none, by measured "
                              "sensitivity under a cost budget; writes a layer policy")
    sa.add_argument("--budget", type=float, default=0.3,
                    help="fraction of the full model's attention FLOPs per token at --context to spend")
    sa.add_argument("--context", type=int, default=8192, help="context length the cost model assumes")
    sa.add_argument("--sinks", type=int, default=4)
    sa.add_argument("--window", type=int, default=64)
    sa.add_argument("--windows", type=int, default=2, help="WikiText-2 calibration windows")
    sa.add_argument("--length", type=int, default=320, help="tokens per window (more than sinks + window)")
    sa.add_argument("--held-out", type=int, default=2, help="windows after the calibration ones to verify on")
    sa.add_argument("--reuse", help="an earlier policy file: solve again from its measured sensitivities (its "
                                    "sinks, window and calibration windows replace --sinks --window --windows --length)")
    sa.add_argument("--out", required=True, help="the layer policy (.json)")
    sa.set_defaults(func=cmd_search_attention)


def cmd_search_reuse(args) -> int:
    from ..tools.calibration_text import wikitext_windows
    from ..tools.reuse_search import search_reuse

    if not args.out.endswith(".json"):
        raise SystemExit("--out must end in .json (a reuse policy)")
    model, tokenizer = load(args)
    calibration = wikitext_windows(tokenizer, args.windows, args.length)
    policy = search_reuse(model, calibration, args.topk, args.full, args.max_loss, args.queries)
    path = policy.save(args.out)
    report = policy.report
    print(f"full layers {list(policy.full_layers)} (sensitive: {report['sensitive']}); the reusing layers lose "
          f"{report['lost_mass']:.3f} attention mass in all, {report['lost_mass'] / max(len(policy.reuse_layers), 1):.3f} "
          f"each on average; wrote {path}")
    return 0


def add_search_reuse(ssub) -> None:
    """``splice search reuse`` (under the ``search`` command)."""
    sr = ssub.add_parser("reuse", parents=[model_options(), threads_option()],
                         help="HyLRA: profile per-layer attention sensitivity and cross-layer top-k overlap, then "
                              "choose the full layers by dynamic programming; writes a reuse policy")
    sr.add_argument("--topk", type=int, default=1024, help="slots a full layer picks per KV head for those above it")
    sr.add_argument("--full", type=int, default=12, help="number of full layers (layer 0 included)")
    sr.add_argument("--max-loss", type=float, default=0.5,
                    help="a layer losing more than this share of its attention under its own top-k stays full")
    sr.add_argument("--windows", type=int, default=2, help="WikiText-2 calibration windows")
    sr.add_argument("--length", type=int, default=4096, help="tokens per calibration window")
    sr.add_argument("--queries", type=int, default=256, help="last positions of each window profiled")
    sr.add_argument("--out", required=True, help="the reuse policy (.json)")
    sr.set_defaults(func=cmd_search_reuse)


def cmd_route_train(args) -> int:
    from ..adapters.architecture import Adapter
    from ..tools.calibration_text import wikitext_windows
    from ..tools.router_training import fit_influence_router, fit_linear_router, measure_routing_data

    if not args.out.endswith(".safetensors"):
        raise SystemExit("--out must end in .safetensors")
    model, tokenizer = load(args)
    windows = wikitext_windows(tokenizer, args.windows, args.prompt_len + args.continuation)
    data = measure_routing_data(model, windows, args.prompt_len)
    fit = fit_linear_router if args.kind == "linear" else fit_influence_router
    router = fit(data, args.fraction, Adapter(model))
    router.save(args.out)
    print(f"wrote {args.kind} router for layers {list(router.layers)} (target skip fraction {args.fraction}) "
          f"to {args.out}")
    return 0


def add_commands(sub) -> None:
    prof = sub.add_parser("profile", help="measure importance on calibration text")
    psub = prof.add_subparsers(dest="what", required=True)
    pl = psub.add_parser("layers", parents=[model_options()],
                         help="per-layer Block Influence, L2 change, removal KL and perplexity")
    pl.add_argument("--json", required=True, help="write the profile here (and a .png plot beside it)")
    pl.add_argument("--windows", type=int, default=8, help="calibration windows from WikiText-2")
    pl.add_argument("--length", type=int, default=128, help="tokens per window")
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--layers", type=int, help="greedy search for this many layers to skip")
    budget.add_argument("--speedup", type=float, help="greedy search for the layers an ideal speedup needs")
    pl.add_argument("--candidates", type=int, default=16, help="greedy pool: the layers of lowest removal KL")
    pl.set_defaults(func=cmd_profile_layers)

    ph = psub.add_parser("heads", parents=[model_options()],
                         help="score every KV head's need for full attention; write a head map")
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
    rt = rsub.add_parser("train", parents=[model_options()], help="fit a router on WikiText-2 calibration text")
    rt.add_argument("--kind", default="linear", choices=["linear", "influence"])
    rt.add_argument("--fraction", type=float, default=0.25, help="mean fraction of candidate layers to skip")
    rt.add_argument("--windows", type=int, default=32)
    rt.add_argument("--prompt-len", type=int, default=64)
    rt.add_argument("--continuation", type=int, default=32)
    rt.add_argument("--out", required=True, help="router file (.safetensors)")
    rt.set_defaults(func=cmd_route_train)
