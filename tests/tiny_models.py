"""Tiny random-weight models of every supported family, built in code (no downloads)."""

import torch
import transformers as T

CONFIGS = {
    "llama": T.LlamaConfig,
    "mistral": T.MistralConfig,
    "qwen2": T.Qwen2Config,
    "qwen3": T.Qwen3Config,
    "phi3": T.Phi3Config,
    "gemma2": T.Gemma2Config,
    "gemma3": T.Gemma3TextConfig,
}
HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 4, 16, 3, 128


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **config_overrides):
    torch.manual_seed(seed)
    config = CONFIGS[family](**{
        "hidden_size": HIDDEN, "intermediate_size": 96, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": 2, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **config_overrides,
    })
    cls = T.Gemma3ForCausalLM if family == "gemma3" else T.AutoModelForCausalLM
    model = cls(config) if family == "gemma3" else cls.from_config(config)
    with torch.no_grad():  # Gemma norms start at zero weight; make every norm non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5).add_(1.0)
    return model.to(dtype).eval()


def logits(model, ids, mask):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def greedy(model, ids, mask, n=6):
    """``n`` greedy new tokens after ``ids`` (pad token 0), the prompt included."""
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def left_padded_batch(lengths=(7, 4, 5), seed: int = 1):
    """input_ids and attention_mask for rows of the given lengths, left padded with token 0."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


class FoldedTokenizer:
    """A real tokenizer with ids folded into the tiny models' vocabulary (for text-driven code paths)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id % VOCAB

    def __call__(self, text, **kw):
        out = self.tokenizer(text, **kw)
        ids = out["input_ids"]
        out["input_ids"] = ids % VOCAB if isinstance(ids, torch.Tensor) else [i % VOCAB for i in ids]
        return out

    def decode(self, ids, **kw):
        return self.tokenizer.decode(ids, **kw)

    def apply_chat_template(self, messages, **kw):
        out = self.tokenizer.apply_chat_template(messages, **kw)
        out["input_ids"] = out["input_ids"] % VOCAB
        return out
