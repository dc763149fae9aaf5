"""Decoding drivers: compiled decoding over a static KV cache (:mod:`.compiled_decode`) and GemFilter's
filtered generation (:mod:`.gemfilter_generate`)."""
