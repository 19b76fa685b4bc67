"""What differs between the transformers versions pyproject.toml allows, in one place.

The key/value cache argument of a forward pass is `past_key_values` up to 5.2x, then `cache`
(5.24 deprecates the old name, to be removed in 5.40); the output field follows it. An unknown
keyword lands in **kwargs without an error in some versions, so the name is read off the
model's own signature rather than guessed.
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
