"""What differs between the transformers versions pyproject.toml allows, in one place.

The key/value cache argument of a forward pass is `past_key_values` up to 5.2x, then `cache`
(5.24 deprecates the old name, to be removed in 5.40); the output field follows it. An unknown
keyword lands in **kwargs without an error in some versions, so the name is read off the
model's own signature rather than guessed.

Activation checkpointing is `gradient_checkpointing_enable` up to 5.2x, then
`activation_checkpointing_enable` (the old name warns, to be removed in v6).
"""

from __future__ import annotations

import functools
import inspect


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.lru_cache(maxsize=16)
def _cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{name: cache} for a forward pass of `model` (a transformers model or a peft wrapper)."""
    return {_cache_name(type(_hf_model(model))): cache}


def output_cache(output):
    """The key/value cache a forward pass with use_cache=True returned."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def checkpoint_activations(model) -> None:
    """Keep only each decoder layer's input in the forward pass and recompute the rest in the
    backward (non-reentrant torch.utils.checkpoint, which restores the RNG state: LoRA dropout
    draws the same masks, so the gradients are the same numbers). Layers checkpoint only while
    the model trains; scoring in eval mode runs as before."""
    hf = _hf_model(model)
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable({"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
