"""Fused Triton kernels of the text side and the loss, installed as ``softcpt_dist.kernels``.

- ``prompt_assembly``: the packed text-encoder input (token or context row + positional embedding);
- ``shared_prefix_attention``: attention over the shared-prefix prompt tree, forward and backward;
- ``cosine_ce``: cosine logits + per-task cross-entropy (and within-task predictions), fused.

Each module holds its Triton kernel(s), an autograd function and a dispatcher; the PyTorch path in
``softcpt_dist.model`` is the reference and the fallback. ``_triton.use_triton`` decides (config
``kernels.enabled``: ``auto`` runs Triton on CUDA tensors and, under ``TRITON_INTERPRET=1``, on fp32
CPU tensors).
"""
