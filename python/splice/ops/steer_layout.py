"""Layout of a steering table's ``params`` rows, shared by every backend of ``splice::fused_steer``.

``params[slot, k]`` holds, in this order: alpha, beta, lo, hi, start, end, phase (all float32).
Positions are exact in float32 up to 2**24 tokens.
"""

ALPHA, BETA, LO, HI, START, END, PHASE = range(7)
NPARAMS = 7

PHASE_ALL = 0
PHASE_PROMPT = 1
PHASE_GENERATED = 2
