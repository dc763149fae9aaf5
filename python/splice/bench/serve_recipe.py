"""Recipes of random steering directions for serving tests and ``splice bench serve``.

Speed does not depend on what a direction means, only on where it applies, so these are seeded
random unit directions at every layer (``add`` at site ``out``), optionally with one ``ablate`` at
site ``mlp``, and optionally the learned kinds: ``gated`` (``v0`` behind a token gate on ``v1``) and
``rank8`` (a random rank-8 map at every layer).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..steering.files import save_intervention
from ..steering.maps import LowRank
from ..vectors.io import save_vectors
from ..vectors.vector_set import VectorSet


def write_recipe(directory: str | Path, hidden_size: int, num_layers: int, count: int, scale: float = 4.0,
                 ablate: bool = False, seed: int = 0, learned: bool = False) -> Path:
    """Write ``v0..v{count-1}`` (and ``flat``, an ablation, when ``ablate``; ``gated`` and ``rank8``
    when ``learned``, which needs ``count`` ≥ 2) and ``recipe.yaml``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    vectors = {}
    names = [f"v{i}" for i in range(count)] + (["flat"] if ablate else [])
    for name in names:
        dirs = {l: torch.nn.functional.normalize(torch.randn(hidden_size, generator=gen), dim=0)
                for l in range(num_layers)}
        site = "mlp" if name == "flat" else "out"
        save_vectors(VectorSet(dirs, site=site, method="random"), directory / f"{name}.safetensors")
        vectors[name] = {"file": f"{name}.safetensors", "scale": 1.0 if name == "flat" else scale,
                         "op": "ablate" if name == "flat" else "add", "site": site}
    if learned:
        rank = 8
        layers = range(num_layers)
        save_intervention(LowRank(A={l: torch.randn(hidden_size, rank, generator=gen) / hidden_size ** 0.5 for l in layers},
                                  B={l: torch.randn(hidden_size, rank, generator=gen) / rank for l in layers}),
                          directory / "rank8.safetensors")
        vectors["rank8"] = {"map": "rank8.safetensors"}
        vectors["gated"] = {"file": "v0.safetensors", "scale": scale,
                            "gate": {"direction": "v1.safetensors", "threshold": 0.0, "temperature": 0.05}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "steering": {"vectors": vectors}}, sort_keys=False))
    return path
