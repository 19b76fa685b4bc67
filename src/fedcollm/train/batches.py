"""Shuffled mini-batches of encoded examples, reproducible from a seed, and the optimizer that
trains on them."""

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


def forward_passes(idx: list[int], micro_batch_size: int) -> list[list[int]]:
    """A batch's indices as forward passes of at most micro_batch_size examples (0: one pass)."""
    micro = micro_batch_size or len(idx)
    return [idx[start:start + micro] for start in range(0, len(idx), micro)]


def batches(examples: list[Encoded], batch_size: int, pad_id: int, seed: int, device: torch.device,
            micro_batch_size: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Each optimizer step's batch, as the forward passes it is computed in (one unless
    micro_batch_size is below batch_size): the batches, and so the steps, do not depend on it."""
    for idx in index_batches(len(examples), batch_size, seed):
        yield [on(device, collate([examples[i] for i in part], pad_id)) for part in forward_passes(idx, micro_batch_size)]


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
              device: torch.device) -> torch.optim.AdamW:
    """AdamW; on a GPU the fused kernel (one launch for every adapter tensor rather than a few
    per tensor: a LoRA adapter is hundreds of small tensors)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
