"""One file per run holding everything needed to continue after the last complete round.

Written to a temporary file and renamed over the old one (atomic on POSIX), so a crash at any
moment leaves either the previous or the new checkpoint, never half of one. Client and KD
optimizers start fresh every round (as FedAvg clients do), and every random draw on the server
and the clients is seeded from (seed, round, client), so adapters + round + metrics are the
whole state; torch's RNG state is kept as well for code that draws without a seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fedcollm.crash import maybe_kill
from fedcollm.version import code_version

NAME = "checkpoint.pt"


def save(out: Path, round_: int, digest: str, slm_state: dict, llm_state: dict, rows: list[dict]) -> Path:
    target = Path(out) / NAME
    tmp = target.with_name(f".{NAME}.tmp-{os.getpid()}")
    state = {"round": round_, "config_digest": digest, "code_version": code_version(),
             "rows_json": json.dumps(rows),
             "slm": {k: v.detach().cpu() for k, v in slm_state.items()},
             "llm": {k: v.detach().cpu() for k, v in llm_state.items()},
             "torch_rng": torch.get_rng_state()}
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    maybe_kill("checkpoint", round_)  # tests: a crash between writing and renaming
    os.replace(tmp, target)
    return target


def load(out: Path) -> dict | None:
    path = Path(out) / NAME
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    state["rows"] = json.loads(state.pop("rows_json"))
    return state
