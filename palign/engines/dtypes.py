"""Model dtype names (``engine.dtype``, ``train.dtype``) as torch dtypes: one table for the
inference engines and training."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """``"auto"`` means float32 on CPU (bf16 is slower there) and bfloat16 on a GPU."""
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]
