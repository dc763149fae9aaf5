"""What a patched model runs: per-token state, steering tables, skip state, KV-cache helpers and the spliced forwards."""
