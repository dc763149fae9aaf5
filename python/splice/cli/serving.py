"""``splice serve``: vLLM's OpenAI server with the splice plugin and middleware."""

from __future__ import annotations


def cmd_serve(args) -> int:
    import os

    from ..serving.launch import command, server_env

    options = {k: v for k, v in (("registry", args.registry), ("max_slots", args.max_slots), ("head_map", args.head_map))
               if v is not None}
    cmd = command(args.recipe, args.vllm_args, **options)
    print("splice: " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, server_env())


def add_commands(sub) -> None:
    sv = sub.add_parser("serve", help="serve a model behind vLLM with a recipe (per-request steering)")
    sv.add_argument("--recipe", required=True, help="recipe file (.yaml/.json) whose vectors requests may choose")
    sv.add_argument("--registry", help="directory for interventions registered at run time: turns on the admin "
                                       "endpoint /splice/v1/interventions (bearer token from SPLICE_ADMIN_TOKEN)")
    sv.add_argument("--max-slots", type=int, help="distinct steering configurations in flight at once "
                                                  "(default: vLLM's max_num_seqs); more wait, then get 503")
    sv.add_argument("--head-map", help="head map (splice heads) whose windowed layers run vLLM's per-layer "
                                       "sliding windows: kind 'window', each layer all full or all windowed")
    sv.set_defaults(func=cmd_serve, vllm_args=[])  # every other argument goes to vLLM (--model DIR, --port, ...)
