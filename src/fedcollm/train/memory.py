"""Out of device memory: a one-line error that names the settings which give memory back.

torch's own message says how many bytes were missing, not which of this project's settings to
change; the step that ran out of memory and its remedies are known only here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fedcollm.errors import FedCoLLMError


class OutOfMemory(FedCoLLMError):
    """A step ran out of device memory (the message says which, and what to set)."""


CHECKPOINTING = "model.activation_checkpointing = true (the same numbers, ~10x less activation memory)"


def training_advice(section: str, batch_size: int) -> str:
    """What gives a training pass memory back: `section` is "client" or "distill"."""
    return (f"set {CHECKPOINTING}, or {section}.micro_batch_size below {section}.batch_size = {batch_size} "
            "(the same step in smaller forward passes)")


def scoring_advice(batch_size: int, setting: str = "run.eval_batch_size") -> str:
    return f"lower {setting} (choices per forward pass, {batch_size} now)"


@contextlib.contextmanager
def out_of_memory_advice(what: str, advice: str) -> Iterator[None]:
    """Turn torch's OutOfMemoryError inside the block into an OutOfMemory: what ran out, torch's
    first line (how much was missing), and `advice`. Any other error passes through as it is."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        lines = str(e).strip().splitlines()
        raise OutOfMemory(f"{what}: out of memory ({(lines[0] if lines else 'no detail')[:160]}); {advice}") from None
