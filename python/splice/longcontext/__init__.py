"""Long-context interventions: GemFilter's early-layer token selection (:mod:`.gemfilter`)."""
