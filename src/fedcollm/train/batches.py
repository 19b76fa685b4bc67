"""Shuffled mini-batches of encoded examples, reproducible from a seed."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from fedcollm.data.encode import Encoded, collate


def batches(examples: list[Encoded], batch_size: int, pad_id: int, seed: int,
            device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
