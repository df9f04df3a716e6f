"""One-to-one matching of found things to wanted things (segments of a render to reference objects).

Compositional guidance (KV-mixed visual prompts) generates once, segments the render, and must decide
which segment is which reference before it can confine each reference to its segment. Taking each
reference's most similar segment independently can give two references the same segment; the
Hungarian algorithm (scipy's linear_sum_assignment) finds the assignment with the best total instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Match:
    row: int  # e.g. the reference
    column: int  # e.g. the segment
    score: float  # its entry of the matrix that was matched


def hungarian(cost, maximize: bool = False) -> list[Match]:
    """The one-to-one assignment of rows to columns with the least (or, maximize, the greatest) total.

    Rectangular matrices match min(rows, columns) pairs: the rows (or columns) left over get nothing.
    Non-finite entries (a pair that must never match) are refused unless a finite assignment exists."""
    from scipy.optimize import linear_sum_assignment

    matrix = np.asarray(cost, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"the cost matrix must be 2-D, got shape {matrix.shape}")
    if matrix.size == 0:
        return []
    if np.isnan(matrix).any():
        raise ValueError("the cost matrix has NaN entries")
    rows, columns = linear_sum_assignment(matrix, maximize=maximize)
    return [Match(int(r), int(c), float(matrix[r, c])) for r, c in zip(rows, columns)]


def match_by_similarity(similarity, min_similarity: float | None = None) -> list[Match]:
    """Rows to columns by the greatest total similarity; pairs below `min_similarity` are dropped after
    matching (a reference with no segment like it gets none rather than a wrong one)."""
    matches = hungarian(similarity, maximize=True)
    if min_similarity is None:
        return matches
    return [m for m in matches if m.score >= min_similarity]
