"""Padding ragged per-token lists into rectangular arrays (shared by the batch and TIS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["as_numpy", "pad_ragged"]


def pad_ragged(rows: Sequence[Sequence[float] | np.ndarray], pad: float, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ``rows`` to ``[len(rows), max_len]``; returns ``(array, mask)``.

    ``mask[i, j]`` is True where ``array[i, j]`` is a real element of ``rows[i]``.
    """
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    out = np.full((len(rows), width), pad, dtype=dtype)
    mask = np.arange(width)[None, :] < lengths[:, None]
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = row
    return out, mask


def as_numpy(x: Any) -> np.ndarray:
    """``np.asarray`` that also takes torch tensors (on any device, with grad, bf16)
    without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)
