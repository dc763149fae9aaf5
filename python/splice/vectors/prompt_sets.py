"""Prompt sets shipped in ``splice/vectors/data/prompts/<name>.json`` or given as a user file.

A set is a JSON object of string lists: ``positive`` and ``negative`` (a condition's or a concept
probe's two classes) and/or ``instructions`` (held-out requests to generate from), plus an optional
``description``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

LIST_KEYS = ("positive", "negative", "instructions")


def builtin_names() -> list[str]:
    data = resources.files(__package__).joinpath("data", "prompts")
    return sorted(f.name[:-5] for f in data.iterdir() if f.name.endswith(".json"))


def builtin_prompt_set(name: str) -> dict[str, list[str]]:
    if name not in builtin_names():
        raise ValueError(f"no built-in prompt set {name!r}; available: {builtin_names()}")
    text = resources.files(__package__).joinpath("data", "prompts", f"{name}.json").read_text(encoding="utf-8")
    return parse_prompt_set(text, name)


def load_prompt_set(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    return parse_prompt_set(path.read_text(encoding="utf-8"), str(path))


def parse_prompt_set(text: str, source: str) -> dict[str, list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON: {e}") from None
    if not isinstance(data, dict) or not any(k in data for k in LIST_KEYS):
        raise ValueError(f"{source}: expected an object with lists {LIST_KEYS}")
    out = {}
    for key in LIST_KEYS:
        if key not in data:
            continue
        items = data[key]
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
            raise ValueError(f"{source}: {key!r} must be a non-empty list of non-empty strings")
        out[key] = list(items)
    return out


def require(prompt_set: dict, *keys: str, source: str = "prompt set") -> None:
    missing = [k for k in keys if k not in prompt_set]
    if missing:
        raise ValueError(f"{source} has no {missing}; it needs {list(keys)}")


def as_chat(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as the model sees it in a chat: one user turn and the assistant's opening."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]
