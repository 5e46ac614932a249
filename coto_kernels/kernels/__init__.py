"""Kernels of the gated LoRA linear layer, one module per backend with one contract.

Each backend module provides ``lora_forward``, ``lora_backward`` and ``dropout_keep_mask`` with the same
signatures; ``coto_kernels.functional`` picks one per call. ``lora_torch`` runs everywhere; ``lora_triton``
needs Triton (a GPU, or the CPU interpreter with ``TRITON_INTERPRET=1`` set before import).
"""
