"""Fused Triton kernels of the text side and the loss, installed as ``softcpt_dist.kernels``.

- ``prompt_assembly``: the packed text-encoder input (token or context row + positional embedding);
- ``shared_prefix_attention``: attention over the shared-prefix prompt tree, forward and backward;
- ``cosine_ce``: cosine logits + per-task cross-entropy (and within-task predictions), fused.

Each module holds its Triton kernel(s) and an autograd function over plain tensors, and imports
nothing of ``softcpt_dist.model``. The model's dispatchers decide when to call them and keep the
PyTorch reference and fallback: ``model.prompt_layout.prompt_assembly``,
``model.tree_attention.shared_prefix_attention``, ``model.loss.{cosine_cross_entropy,
within_task_predict}``. ``_triton.use_triton`` is their shared decision (config ``kernels.enabled``:
``auto`` runs Triton on CUDA tensors and, under ``TRITON_INTERPRET=1``, on fp32 CPU tensors).
"""
