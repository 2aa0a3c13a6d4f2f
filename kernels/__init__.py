"""Fused Triton kernels (prompt assembly + text encoding, cosine-logit cross-entropy).

Installed as ``softcpt_dist.kernels``. Each kernel module carries its Triton kernel, an autograd
function and a plain PyTorch reference; until a kernel lands, callers use the references in
``softcpt_dist`` directly.
"""
