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
    """loss (mean over completion tokens), ppl = exp(loss), n (sequences), tokens, and per sequence
    in `examples`' order its summed loss (`seq_nll`) and token count (`seq_tokens`); `batch_size`
    sequences per forward pass, longest first (little padding, and an out-of-memory shows at once)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    seq_nll = torch.zeros(len(examples), dtype=torch.float64, device=device)
    bar = progress_bar(len(groups), desc, progress)
    for group in groups:
        batch = on(device, collate([examples[i] for i in group], pad_id))
        logits, target = answer_logits(model, batch)
        per_token = F.cross_entropy(logits.float(), target, reduction="none").double()
        # answer positions come example-major, n_target of them per example (encode.collate)
        rows = torch.repeat_interleave(torch.arange(len(group), device=device),
                                       torch.tensor([examples[i].n_target for i in group], device=device))
        seq_nll.index_add_(0, torch.tensor(group, device=device)[rows], per_token)
        bar.update(1)
    bar.close()
    seq_tokens = [e.n_target for e in examples]
    nll = seq_nll.tolist()  # one host sync for the whole set
    loss = sum(nll) / max(sum(seq_tokens), 1)
    if math.isnan(loss):  # a diverged model: a NaN would print as a score
        raise FedCoLLMError(f"evaluation: the model's completion loss is NaN over {len(examples)} items: its "
                            "weights diverged (a learning rate too high?)")
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "n": len(examples), "tokens": sum(seq_tokens),
            "seq_nll": nll, "seq_tokens": seq_tokens}
