"""Shuffled mini-batches of encoded examples, reproducible from a seed."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from fedcollm.data.encode import Encoded, collate


def index_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Indices 0..n-1 shuffled by `seed`, in chunks of batch_size."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def batches(examples: list[Encoded], batch_size: int, pad_id: int, seed: int,
            device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for idx in index_batches(len(examples), batch_size, seed):
        yield on(device, collate([examples[i] for i in idx], pad_id))


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
