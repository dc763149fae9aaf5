"""``splice serve``: vLLM's OpenAI server with the splice plugin and middleware."""

from __future__ import annotations


def cmd_serve(args) -> int:
    import os

    from ..serving.launch import command, server_env

    cmd = command(args.recipe, args.vllm_args)
    print("splice: " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, server_env())


def add_commands(sub) -> None:
    sv = sub.add_parser("serve", help="serve a model behind vLLM with a recipe (per-request steering)")
    sv.add_argument("--recipe", required=True, help="recipe file (.yaml/.json) whose vectors requests may choose")
    sv.set_defaults(func=cmd_serve, vllm_args=[])  # every other argument goes to vLLM (--model DIR, --port, ...)
