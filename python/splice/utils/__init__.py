"""Low-level utilities with no splice dependencies, usable from every layer."""
