"""splice.quant: group-wise weight quantizers, the packed weight format and the quantized Linear.

Dequantisation everywhere is ``w ≈ (q − z) · s`` with integer codes ``q`` in ``[0, 2**bits − 1]`` and a
float16 scale ``s`` and zero point ``z`` per group of ``group_size`` consecutive weights of a row.
"""
