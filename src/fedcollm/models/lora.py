"""LoRA adapters (peft) and the adapter tensors that cross the network, as numpy arrays."""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open

from fedcollm.errors import FedCoLLMError


def attach_lora(model, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...],
                freeze_a: bool = False, seed: int = 0):
    """Wrap `model` with a fresh LoRA adapter; only the adapter's tensors are trainable, and with
    `freeze_a` only its B matrices (each A then drawn from `seed`, see `_draw_frozen_a`)."""
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                           if isinstance(mod, torch.nn.Linear)})
    missing = [t for t in target_modules if t not in linear_names]
    if missing:
        raise FedCoLLMError(
            f"config: lora.target_modules {missing} not in {type(model).__name__}; "
            f"its linear modules are: {', '.join(linear_names)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft (0.21) reads `is_gradient_checkpointing`, which transformers 5 deprecates with a
        # FutureWarning: one per model built, in every client's log, and nothing for a user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    if freeze_a:
        _draw_frozen_a(model, seed)
    return model


def _frozen_a(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n and not p.requires_grad]


def _draw_frozen_a(model, seed: int) -> None:
    """Freeze every A at a draw from `seed`: PEFT's own distribution (kaiming-uniform with
    a = √5, i.e. U(±1/√fan_in)), drawn on the CPU in the model's parameter order, so that every
    party (server, clients, any device) holds the same A without it ever being sent."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(p.shape[1])
            draw = (torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
            with torch.no_grad():
                p.copy_(draw.to(p.device, p.dtype))
            p.requires_grad_(False)


def frozen_a_digest(model) -> str:
    """sha256 of the frozen A matrices ("" when A trains): the server sends its own so that a
    client whose draw differs (another torch version, another seed) refuses instead of training
    B against an A the server does not have."""
    frozen = _frozen_a(model)
    if not frozen:
        return ""
    h = hashlib.sha256()
    for name, p in frozen:
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors, in the model's (deterministic) order: what trains,
    travels and is checkpointed. A frozen A is not among them: every party draws the same one."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return get_peft_model_state_dict(model, state_dict={k: v for k, v in model.state_dict().items()
                                                        if k not in frozen})


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


def run_base(folder: Path) -> tuple[str, tuple[int, int] | None] | None:
    """(the base model, its pruning: (first, last) for an SLM cut from the LLM, else None) that
    the adapter saved at OUT/adapters/{slm,llm} was trained on, read from OUT/config.toml; None
    when that file is not there (an adapter from elsewhere)."""
    try:
        model = tomllib.loads((Path(folder).resolve().parent.parent / "config.toml").read_text())["model"]
        if Path(folder).name == "slm" and not model["slm"]:
            return str(model["llm"]), (int(model["slm_keep_first"]), int(model["slm_keep_last"]))
        return str(model["slm"] if Path(folder).name == "slm" else model["llm"]), None
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        return None


def _fmt(prune: tuple[int, int] | None) -> str:
    return f"--prune {prune[0]},{prune[1]}" if prune else "no --prune"


def load_saved_adapter(model, path: str, prune: tuple[int, int] | None = None):
    """A saved LoRA adapter folder on `model` (pruned by `prune`), refused in one line when it is
    missing or was trained on another base: an SLM adapter on the whole LLM, or on other layers,
    would load into whatever layers carry its names and score without complaint. Checked against
    the run's config.toml where the folder is a run's, and its layer count always."""
    folder = Path(path)
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise FedCoLLMError(f"--adapter {path}: no adapter_config.json and adapter_model.safetensors there "
                            "(a run's OUT/adapters/slm or OUT/adapters/llm)")
    base = run_base(folder)
    trained_on = base[1] if base else None
    if base is not None and trained_on != prune:
        raise FedCoLLMError(f"--adapter {path} was trained on a base with {_fmt(trained_on)} (its run's "
                            f"config.toml), not {_fmt(prune)}")
    with safe_open(str(weights), "pt") as f:
        layers = {int(m.group(1)) for key in f.keys() if (m := re.search(r"\.layers\.(\d+)\.", key))}
    n_model = len(model.model.layers)
    if layers and max(layers) + 1 != n_model:
        raise FedCoLLMError(f"--adapter {path} adapts {max(layers) + 1} decoder layers, the model has {n_model}: "
                            "an SLM adapter needs the SLM's --prune FIRST,LAST")
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedCoLLMError(f"--adapter {path} does not fit this model: {first}") from None
