"""Experiments built on coto_kernels (optional extras; see each module)."""
