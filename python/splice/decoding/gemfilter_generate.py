"""``splice.gemfilter_generate``: Hugging Face ``generate`` on the prompt tokens a
:class:`~splice.longcontext.gemfilter.GemFilter` keeps (selected at prefill, decoded on them).

The selection pass runs the model's first ``layer`` layers (plus the keys of layer ``layer``) on
the whole prompt; ``generate`` then prefills and decodes on the kept tokens only, so its KV cache
holds ``len(kept)`` prompt positions. Whatever else is patched into the model (steering, skips,
hybrid heads, quantized linears) runs in both passes as usual; steering entries that name token
positions see the renumbered positions of the filtered prompt.
"""

from __future__ import annotations

import torch

from ..longcontext.gemfilter import GemFilter, select


def gemfilter_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       gemfilter: GemFilter, **generate_kwargs) -> torch.Tensor:
    """``[batch, n + new]``: the original prompt followed by ``model.generate``'s continuation of the
    filtered prompt (``generate_kwargs`` go to ``generate``; left padding as there)."""
    config = getattr(model, "generation_config", None)
    pad = generate_kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    chosen = select(model, input_ids, attention_mask, gemfilter, pad_token_id=0 if pad is None else int(pad))
    with torch.inference_mode():
        out = model.generate(input_ids=chosen.input_ids, attention_mask=chosen.attention_mask, **generate_kwargs)
    return torch.cat([input_ids, out[:, chosen.input_ids.shape[1]:]], dim=1)
