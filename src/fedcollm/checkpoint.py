"""One file per run holding everything needed to continue after the last complete round, and one
per long training pass outside a run (centralized, standalone: `save_pass`) to continue after
its last complete epoch.

Written to a temporary file and renamed over the old one (atomic on POSIX), so a crash at any
moment leaves either the previous or the new checkpoint, never half of one. Client and KD
optimizers start fresh every round (as FedAvg clients do), and every random draw on the server
and the clients is seeded from (seed, round, client), so adapters (the server's and, under a
lossy transport, the reference the clients hold) + round + metrics are the whole state; torch's
RNG state is kept as well for code that draws without a seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from fedcollm.crash import maybe_kill
from fedcollm.version import code_version

NAME = "checkpoint.pt"


def replace_atomically(target: Path, write: Callable, before_rename: Callable = lambda: None) -> Path:
    """write(fh) into a temporary file beside target, then rename it over target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    before_rename()
    os.replace(tmp, target)
    return target


def write_json(path: Path, obj) -> Path:
    """obj as one line of JSON at path, atomically (results and finished parts of a job)."""
    return replace_atomically(path, lambda fh: fh.write((json.dumps(obj) + "\n").encode()))


def save(out: Path, round_: int, digest: str, slm_state: dict, llm_state: dict, rows: list[dict],
         reference: list | None = None) -> Path:
    """reference: the SLM adapter the clients hold (federated/reference.py), when it is not the
    server's own `slm_state` (a lossy transport's rounding)."""
    state = {"round": round_, "config_digest": digest, "code_version": code_version(),
             "rows_json": json.dumps(rows),
             "slm": {k: v.detach().cpu() for k, v in slm_state.items()},
             "llm": {k: v.detach().cpu() for k, v in llm_state.items()},
             "torch_rng": torch.get_rng_state()}
    if reference is not None:
        state["reference"] = [torch.as_tensor(a).clone() for a in reference]
    # tests: a crash between writing and renaming
    return replace_atomically(Path(out) / NAME, lambda fh: torch.save(state, fh),
                              before_rename=lambda: maybe_kill("checkpoint", round_))


def load(out: Path) -> dict | None:
    path = Path(out) / NAME
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    state["rows"] = json.loads(state.pop("rows_json"))
    return state


def save_pass(path: Path, key: str, state: dict) -> Path:
    """A training pass's state (tensors anywhere, nested in dicts and lists), under `key`: what
    it was computed for, so that `load_pass` never hands it to another training."""
    return replace_atomically(path, lambda fh: torch.save({"key": key, **_on_cpu(state)}, fh))


def load_pass(path: Path | None, key: str) -> dict | None:
    """The state saved at path for `key`, or None (no file, or one saved for another training)."""
    if path is None or not Path(path).is_file():
        return None
    state = torch.load(path, weights_only=True)
    if state.get("key") != key:
        print(f"[fedcollm] {path}: saved for another training ({state.get('key')}, not {key}); starting afresh",
              flush=True)
        return None
    return state


def _on_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _on_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_on_cpu(v) for v in x)
    return x
