"""Layout of a steering table's ``params`` rows, shared by every backend of ``splice::fused_steer``.

``params[slot, k]`` holds, in this order (all float32): alpha, beta, lo, hi, start, end, phase,
kind, gated, index. Positions are exact in float32 up to 2**24 tokens. Each entry is one step of a
small program run on every token's row ``u`` (see :mod:`splice.ops.steer_reference`); ``kind``
says which step and how the fields read:

* ``KIND_PROJECT``  ``u += f·(alpha + beta·(clamp(⟨u,v⟩, lo, hi) − ⟨u,v⟩))·v``  (add, ablate, clamp)
* ``KIND_GATE``     sets the gate register ``g``: from the row gate ``gates[t, index]`` when
  ``index >= 0``; else from the score ``s = ⟨u,v⟩`` (``beta = 1``: ``⟨u,v⟩/|u|``, a cosine) as
  ``g = sigmoid((s − lo)·alpha)`` (``alpha`` the inverse temperature; infinite: ``g = [s > lo]``)
* ``KIND_SCALE``    ``u += f·alpha·(v ⊙ u)``                 (per-dimension gain; heads scaled or zeroed)
* ``KIND_READ``     ``reg[index] = ⟨u,v⟩``                   (a low-rank map's projections, all read
  from the same ``u`` before its writes)
* ``KIND_WRITE``    ``u += f·alpha·(reg[index] − lo)·v``

``f`` is ``g`` where ``gated`` is 1, else 1. ``g`` starts at 1 on every token and is set to 0 by a
gate entry whose window or phase does not admit the token; the registers start at 0. ``index`` holds
a whole number (it is truncated toward zero).
"""

ALPHA, BETA, LO, HI, START, END, PHASE, KIND, GATED, INDEX = range(10)
NPARAMS = 10

PHASE_ALL = 0
PHASE_PROMPT = 1
PHASE_GENERATED = 2

KIND_PROJECT = 0
KIND_GATE = 1
KIND_SCALE = 2
KIND_READ = 3
KIND_WRITE = 4

MAX_RANK = 16  # registers per token: the largest rank of a low-rank map
