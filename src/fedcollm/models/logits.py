"""Logits only where a loss or a score needs them."""

from __future__ import annotations

import torch


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict answer tokens (position t predicts label t+1), and
    those labels.

    Only those rows go through the LM head: the (batch × length × vocabulary) logits, 250 MB per
    model for a batch of 8×160 with a 49k vocabulary, are never built, and neither is their
    gradient. The LoRA layers sit inside the decoder's modules, so gradients still reach them.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows = batch["answer_rows"]  # made by collate on the host: no data-dependent sync here
    logits = base.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows))
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3 squash their logits; do as their forward does
        logits = torch.tanh(logits / cap) * cap
    return logits, batch["labels"].reshape(-1).index_select(0, rows + 1)
