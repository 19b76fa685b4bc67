"""Reject a client update before it is averaged: wrong tensors, non-finite values, a claimed
weight above the cap, or a step θ_k − θ_global too large to be honest training."""

from __future__ import annotations

import numpy as np


def shape_problem(arrays: list[np.ndarray], reference: list[np.ndarray]) -> str | None:
    """Why `arrays` do not fit the adapter `reference` (tensor count, then each shape), or None."""
    if len(arrays) != len(reference):
        return f"{len(arrays)} adapter tensors, expected {len(reference)}"
    for i, (a, ref) in enumerate(zip(arrays, reference)):
        if a.shape != ref.shape:
            return f"tensor {i} has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
    return None


def update_problem(arrays: list[np.ndarray], global_adapter: list[np.ndarray], num_examples: int,
                   max_norm: float, max_examples: int) -> str | None:
    """Why this update must not be averaged, or None if it is fine.

    The adapter travels as a list in the model's fixed key order: a missing or extra key shows
    as a wrong count, a wrong key as a wrong shape. A client's example count is its own claim:
    it is capped by `max_examples` (federation.max_client_examples) so that no client can take
    over the weighted mean by claiming more.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        return f"example count {num_examples!r} is not a positive integer"
    if num_examples > max_examples:
        return f"example count {num_examples} exceeds federation.max_client_examples = {max_examples}"
    if problem := shape_problem(arrays, global_adapter):
        return problem
    norm2 = 0.0
    for i, (a, ref) in enumerate(zip(arrays, global_adapter)):
        if not np.issubdtype(a.dtype, np.floating):
            return f"tensor {i} has dtype {a.dtype}, expected a float type"
        if not np.all(np.isfinite(a)):
            return f"tensor {i} holds NaN or Inf"
        norm2 += float(np.sum(np.square(a.astype(np.float64) - ref)))
    norm = norm2 ** 0.5
    if norm > max_norm:
        return f"update norm ‖θ_k − θ_global‖ = {norm:.4g} exceeds federation.max_update_norm = {max_norm:g}"
    return None
