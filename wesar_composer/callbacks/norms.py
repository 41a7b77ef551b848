"""Accurate squared norms of row slices of matrices, from this rank's flat part of each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

__all__ = ['CHUNK', 'slice_sq_norms']

CHUNK = 1 << 18  # elements per norm: keeps float32 norms of large matrices accurate


class Sliced(Protocol):
    shape: tuple[int, int]  # global (rows, d_in)
    slice_sizes: tuple[int, ...]  # rows of each slice


def slice_sq_norms(flats: Sequence[tuple[torch.Tensor, int]], matrices: Sequence[Sliced]) -> torch.Tensor:
    """Squared norm (float64) of every row slice of every matrix, from ``(local flat data, flat start)`` of each.

    Each slice is cut into views of at most ``CHUNK`` elements, normed by one fused
    ``_foreach_norm`` call and the squares summed in float64: a float32 norm over a whole
    embedding (25M elements) drifts by about 1e-3 on the CPU, chunks keep it near 1e-6.
    """
    chunks, owners, n_slices = [], [], 0
    for (flat, start), matrix in zip(flats, matrices):
        d_in, row, n = matrix.shape[1], 0, flat.numel()
        for rows in matrix.slice_sizes:
            lo, hi = row * d_in - start, (row + rows) * d_in - start
            piece = flat[min(max(lo, 0), n) : min(max(hi, 0), n)]
            for chunk in piece.split(CHUNK) if piece.numel() else (piece,):
                chunks.append(chunk)
                owners.append(n_slices)
            n_slices += 1
            row += rows
    squares = torch.stack(torch._foreach_norm(chunks, 2, dtype=torch.float32)).double().square()  # pyright: ignore[reportPrivateImportUsage]
    index = torch.tensor(owners, device=squares.device)
    return torch.zeros(n_slices, dtype=torch.float64, device=squares.device).index_add_(0, index, squares)
