"""Which MMC4 images survive OpenFlamingo's filters, and the sentence each one goes to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

Assignment = Literal["hungarian", "argmax"]

# OpenFlamingo drops an image when len(bytes) // 1000 <= 10, i.e. under 11,000 bytes.
MIN_IMAGE_KB = 10


def large_enough(num_bytes: int) -> bool:
    """OpenFlamingo's size filter on the raw (base64-decoded) image bytes."""
    return num_bytes // 1000 > MIN_IMAGE_KB


def assign_images(
    similarity: np.ndarray | Sequence[Sequence[float]],
    eligible: Sequence[bool],
    threshold: float,
    method: Assignment,
) -> list[tuple[int, int]]:
    """Pairs (image index, sentence index) kept for a document, in ascending image index.

    `similarity` has one row per image of `image_info` and one column per sentence; only rows
    where `eligible` is true take part (present and large enough). `hungarian` is a one-to-one
    assignment maximising total similarity, then pairs under `threshold` are dropped;
    `argmax` sends each image to its most similar sentence when that reaches `threshold`,
    so several images may share a sentence.
    """
    rows = [i for i, ok in enumerate(eligible) if ok]
    if not rows:
        return []
    matrix = np.asarray(similarity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < len(eligible):
        raise ValueError(
            f"similarity matrix has shape {matrix.shape}, expected one row per image "
            f"({len(eligible)})"
        )
    if matrix.shape[1] == 0:
        return []
    sub = matrix[rows]
    if method == "argmax":
        best = sub.argmax(axis=1)
        scores = sub[np.arange(len(rows)), best]
        return [(rows[i], int(best[i])) for i in range(len(rows)) if scores[i] >= threshold]
    picked_rows, picked_cols = linear_sum_assignment(-sub)
    return [
        (rows[int(r)], int(c))
        for r, c in zip(picked_rows, picked_cols, strict=True)
        if sub[r, c] >= threshold
    ]
