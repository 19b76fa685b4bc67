"""Text a model (with its adapter) writes after each prompt, batched: greedy by default, sampled
on request.

Greedy (temperature 0) is the default, as lm-evaluation-harness's generate_until does by default
(do_sample = False): the same prompt gives the same text on every call and in any batch, so the
outputs of two adapters compare. Sampling (temperature > 0, with top-k and top-p) draws from a
generator seeded once per call: the same command with the same seed gives the same text. A
prompt is encoded as training encodes it (data/encode.py: the tokenizer's BOS in front where it
adds one); prompts are grouped longest first and padded on the left, and Hugging Face's generate
derives the positions from the attention mask, so a prompt gives the same greedy text in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcollm.data.encode import bos_prefix, pad_id_of
from fedcollm.errors import FedCoLLMError
from fedcollm.progress import progress_bar


@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen. temperature 0: the argmax (greedy). Otherwise a draw from the
    softmax at that temperature, over the top_k most likely tokens (0: all) whose probabilities
    reach top_p together (1: all). Explicit here, so that a model's own generation_config (e.g.
    Hugging Face's top_k = 50 default) never changes what the options say."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise FedCoLLMError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise FedCoLLMError(f"--top-k {self.top_k}: must be >= 0 (0: no top-k cut)")
        if not 0 < self.top_p <= 1:
            raise FedCoLLMError(f"--top-p {self.top_p}: must be in (0, 1] (1: no nucleus cut)")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise FedCoLLMError("--top-k and --top-p choose among sampled tokens: give a --temperature > 0 with them "
                                "(0 is greedy)")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


GREEDY = Decoding()


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's own (a chat model's
    end-of-turn mark, e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(own if isinstance(own, list) else [own])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, device: torch.device,
             decoding: Decoding = GREEDY, progress: bool = False) -> list[str]:
    """Each prompt's continuation, up to `max_new_tokens` tokens or a stop token (left out),
    decoded without special tokens."""
    model.eval()
    bos, stops = bos_prefix(tokenizer), stop_ids(model, tokenizer)
    pad = pad_id_of(tokenizer)
    ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    if decoding.temperature:
        torch.manual_seed(decoding.seed)  # generate draws from torch's default generators (CPU and CUDA)
    bar = progress_bar(len(ids), "generate", progress)
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        width = max(len(ids[i]) for i in group)
        batch = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in group], device=device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in group], device=device)
        rows = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens,
                              eos_token_id=stops or None, pad_token_id=pad, **decoding.generate_kwargs())
        for i, row in zip(group, rows[:, width:].tolist()):
            end = next((k for k, t in enumerate(row) if t in stops), len(row))
            out[i] = tokenizer.decode(row[:end], skip_special_tokens=True)
        bar.update(len(group))
    bar.close()
    return out
