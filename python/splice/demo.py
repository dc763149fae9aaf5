"""``splice demo``: the main job on the default model, end to end.

1. extract a "happy minus sad" vector from the built-in contrastive pairs (every layer);
2. generate for a few prompts in one batch where row slots pick unsteered, +happy and -happy
   (per-request steering: one forward pass, three behaviours);
3. time decode throughput, unpatched vs steered at every layer.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .bench.timing import decode_tps, make_batch
from .patch import patch
from .steering.spec import Steer
from .vectors.extract import builtin_pairs, extract_vectors

PROMPTS = ["Tell me about your weekend.", "Write one sentence about the rain.", "How do you feel about Mondays?"]
DEFAULT_LAYERS = list(range(12, 19))
DEFAULT_SCALE = 0.4


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, tokenizer, prompts, max_new_tokens):
    enc = tokenizer([_chat(tokenizer, p) for p in prompts], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def run_demo(model, tokenizer, layers=None, scale=None, max_new_tokens=40, console=None) -> dict:
    console = console or Console()
    layers = layers or DEFAULT_LAYERS
    scale = DEFAULT_SCALE if scale is None else scale
    positive, negative = builtin_pairs("happy_sad")
    vectors = extract_vectors(model, tokenizer, positive, negative, layers=layers)
    console.print(f"extracted happy-sad directions at layers {layers[0]}..{layers[-1]} "
                  f"from {len(positive)} pairs; steering scale ±{scale}")

    columns = {"unsteered": 0, f"+happy ×{scale}": 1, f"-happy ×{scale}": 2}
    with patch(model, max_slots=3) as p:
        p.set_slot(1, [Steer(vectors, scale=scale, name="happy")])
        p.set_slot(2, [("happy", -scale)])
        rows = [(prompt, slot) for prompt in PROMPTS for slot in columns.values()]
        p.assign([slot for _, slot in rows])
        texts = generate(model, tokenizer, [prompt for prompt, _ in rows], max_new_tokens)
        backend = p.backends()["fused_steer"]

    table = Table(title="one batch, three steering slots (greedy decoding)", show_lines=True)
    table.add_column("prompt", style="bold")
    for name in columns:
        table.add_column(name)
    for i, prompt in enumerate(PROMPTS):
        table.add_row(prompt, *(t.strip() for t in texts[i * len(columns):(i + 1) * len(columns)]))
    console.print(table)

    speed = throughput(model, vectors)
    perf = Table(title=f"decode throughput (batch 1, fused_steer backend: {backend})")
    for col in ("model", "tokens/s", "ratio"):
        perf.add_column(col)
    for name, tps in speed.items():
        perf.add_row(name, f"{tps:.1f}", f"{tps / speed['unpatched']:.3f}")
    console.print(perf)
    console.print("full benchmark: splice bench steer --json out/steer.json")
    return {"texts": texts, "throughput": speed}


def throughput(model, vectors, steps: int = 16, repeats: int = 3) -> dict[str, float]:
    """Median decode tokens/s at batch 1, unpatched and steered, interleaved."""
    ids = make_batch(1, 32, model.config.get_text_config().vocab_size)
    runs = {"unpatched": [], "steered": []}
    for round_ in range(repeats + 1):
        runs_this = {"unpatched": decode_tps(model, ids, steps)}
        with patch(model, Steer(vectors, scale=1.0)):
            runs_this["steered"] = decode_tps(model, ids, steps)
        if round_:
            for k, v in runs_this.items():
                runs[k].append(v)
    return {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
