"""Text a model (with its adapter) writes after each prompt: greedy decoding, batched.

Greedy, as lm-evaluation-harness's generate_until does by default (do_sample = False): the same
prompt gives the same text on every call, so the outputs of two adapters compare. A prompt is
encoded as training encodes it (data/encode.py: the tokenizer's BOS in front where it adds one);
prompts are grouped longest first and padded on the left, and Hugging Face's generate derives the
positions from the attention mask, so a prompt gives the same text in any batch.
"""

from __future__ import annotations

import torch

from fedcollm.data.encode import bos_prefix, pad_id_of
from fedcollm.progress import progress_bar


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's own (a chat model's
    end-of-turn mark, e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(own if isinstance(own, list) else [own])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, device: torch.device,
             progress: bool = False) -> list[str]:
    """Each prompt's greedy continuation, up to `max_new_tokens` tokens or a stop token (left out),
    decoded without special tokens."""
    model.eval()
    bos, stops = bos_prefix(tokenizer), stop_ids(model, tokenizer)
    pad = pad_id_of(tokenizer)
    ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    bar = progress_bar(len(ids), "generate", progress)
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        width = max(len(ids[i]) for i in group)
        batch = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in group], device=device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in group], device=device)
        rows = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=stops or None, pad_token_id=pad)
        for i, row in zip(group, rows[:, width:].tolist()):
            end = next((k for k, t in enumerate(row) if t in stops), len(row))
            out[i] = tokenizer.decode(row[:end], skip_special_tokens=True)
        bar.update(len(group))
    bar.close()
    return out
