"""Decoding drivers: compiled decoding over a static KV cache (:mod:`.compiled_decode`)."""
