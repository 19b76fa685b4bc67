"""Held-out prompt-completion data: the completion tokens' mean negative log-likelihood (nats per
token; Hugging Face Trainer's eval_loss) and its perplexity. Lower is better.

The loss is the training loss (train/sft.py) without dropout or gradient, summed over every
completion token of the set and divided once, so a long completion weighs by its tokens, as in
training; it is not the mean of per-batch means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedcollm.data.encode import Encoded, collate
from fedcollm.errors import FedCoLLMError
from fedcollm.models.logits import answer_logits
from fedcollm.progress import progress_bar
from fedcollm.train.batches import on


@torch.inference_mode()
def completion_loss(model, examples: list[Encoded], *, batch_size: int, pad_id: int, device: torch.device,
                    progress: bool = False, desc: str = "eval") -> dict:
    """loss (mean over completion tokens), ppl = exp(loss), n (sequences) and tokens; `batch_size`
    sequences per forward pass, longest first (little padding, and an out-of-memory shows at once)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    bar = progress_bar(len(groups), desc, progress)
    for group in groups:
        batch = on(device, collate([examples[i] for i in group], pad_id))
        logits, target = answer_logits(model, batch)
        total += F.cross_entropy(logits.float(), target, reduction="sum").double()
        tokens += len(target)
        bar.update(1)
    bar.close()
    loss = total.item() / max(tokens, 1)
    if math.isnan(loss):  # a diverged model: a NaN would print as a score
        raise FedCoLLMError(f"evaluation: the model's completion loss is NaN over {len(examples)} items: its "
                            "weights diverged (a learning rate too high?)")
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "n": len(examples), "tokens": tokens}
