"""``splice.lfd_generate``: Hugging Face ``generate`` with Layer Fused Decoding
(:class:`~splice.longcontext.layer_fused.LayerFusedDecoding`) on every step's logits.

The fusion replaces the output head's logits, so every logits processor ``generate`` applies
(repetition penalty, temperature, top-k/p, sampling) sees the fused logits, as the paper's decoding
does. Whatever else is patched into the model (steering, quantized linears) runs as usual; the
hooks are removed when ``generate`` returns or raises.
"""

from __future__ import annotations

import torch

from ..longcontext.gemfilter import check_prompt
from ..longcontext.layer_fused import LayerFusedDecoding, layer_fused


def lfd_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 lfd: LayerFusedDecoding, **generate_kwargs) -> torch.Tensor:
    """``model.generate``'s output (prompt and continuation) with ``lfd`` fused into each step's logits;
    ``generate_kwargs`` go to ``generate``. Batches must be left-padded. ValueError before the model
    runs on a bad spec, a model without an adapter, or a batch that is not left-padded."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    check_prompt(input_ids, mask, who="LFD")
    with layer_fused(model, lfd), torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=mask, **generate_kwargs)
