"""LoRA adapters (peft) and the adapter tensors that cross the network, as numpy arrays."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedcollm.errors import FedCoLLMError


def attach_lora(model, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...]):
    """Wrap `model` with a fresh LoRA adapter; only the adapter's tensors are trainable."""
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                           if isinstance(mod, torch.nn.Linear)})
    missing = [t for t in target_modules if t not in linear_names]
    if missing:
        raise FedCoLLMError(
            f"config: lora.target_modules {missing} not in {type(model).__name__}; "
            f"its linear modules are: {', '.join(linear_names)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors, in the model's (deterministic) order."""
    return get_peft_model_state_dict(model)


def adapter_to_ndarrays(model) -> list[np.ndarray]:
    # fp32 on the wire: numpy has no bf16, and the adapter is tiny next to the model.
    return [t.detach().to("cpu", torch.float32).numpy().copy() for t in adapter_state(model).values()]


def load_adapter_ndarrays(model, arrays: list[np.ndarray]) -> None:
    """Set the adapter from arrays in `adapter_state` order; shapes must match exactly."""
    state = adapter_state(model)
    if len(arrays) != len(state):
        raise FedCoLLMError(f"adapter update has {len(arrays)} tensors, expected {len(state)}")
    new = {}
    for (key, ref), arr in zip(state.items(), arrays):
        if tuple(arr.shape) != tuple(ref.shape):
            raise FedCoLLMError(f"adapter tensor {key}: shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        new[key] = torch.from_numpy(np.asarray(arr)).to(ref.device, ref.dtype)
    set_peft_model_state_dict(model, new)


def adapter_numel(model) -> int:
    return sum(t.numel() for t in adapter_state(model).values())


def base_numel(model) -> int:
    """Parameters of the full model without its adapter (what `full SLM` means in the ratio)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
