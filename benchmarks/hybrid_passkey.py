"""First check of hybrid attention on the default model: pass-key accuracy and KV-cache bytes at a
2K context for full attention, the measured head map (docs/heads.json, from
``splice profile heads``) and a random map with as many full heads (the control).

Run: ``.venv/bin/python benchmarks/hybrid_passkey.py [--context 2048] [--samples 4]``.
``splice bench attention`` (8K contexts, decode speed, JSON ratios) is still to come.
"""

import argparse
import random
import time

import torch

import splice
from splice.calibration.passkey import passkey_accuracy, passkey_set
from splice.hybrid.head_map import HeadMap
from splice.models.loader import load_model
from splice.skipping.kv_cache import kv_bytes


def random_map(like: HeadMap, seed: int = 0) -> HeadMap:
    count = sum(len(like.full_heads(l)) for l in range(like.num_layers))
    heads = [(l, h) for l in range(like.num_layers) for h in range(like.num_kv_heads)]
    chosen = random.Random(seed).sample(heads, count)
    full = {l: {h for ll, h in chosen if ll == l} for l in range(like.num_layers)}
    return HeadMap(like.num_layers, like.num_kv_heads, full, like.sinks, like.window, kind=like.kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", default="docs/heads.json")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    model, tok = load_model()
    measured = HeadMap.load(args.heads)
    tasks = passkey_set(tok, args.context, args.samples, seed=100)
    for name, heads in (("full", None), ("measured", measured), ("random", random_map(measured))):
        start = time.perf_counter()
        with splice.patch(model, heads=heads) if heads is not None else torch.inference_mode():
            accuracy = passkey_accuracy(model, tok, tasks)
            with torch.inference_mode():
                cache = model(input_ids=tasks[0].ids, use_cache=True).past_key_values
        print(f"{name:9s} full heads {measured.full_fraction if heads else 1.0:.0%}  pass-key accuracy {accuracy:.2f}  "
              f"KV bytes {kv_bytes(cache)}  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
