"""Accuracy of a finished run's SLM after one more rounding of its adapter by each transport.

    python benchmarks/transport_rounding.py RUN_DIR [RUN_DIR ...] [--modes fp16,int8,int4]

Separates the two ways a lossy transport can cost accuracy: the rounding of the adapter that is
scored (tested here: one encode/decode of the final adapter, no training after it), and what
rounding at every round does to the training that follows (seen only by comparing whole runs,
as results/traffic/ does). Scores on the run's own evaluation items, with its own config;
prints and writes (RUN_DIR/transport_rounding.json) each mode's accuracy and the adapter's
relative rounding error ‖decoded − saved‖ / ‖saved‖.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.experiment.methods import _scores
from fedcollm.federated import transport
from fedcollm.models.lora import adapter_to_ndarrays, load_adapter_ndarrays


def rounding_check(run: Path, modes: list[str]) -> dict:
    cfg = load_config(run / "config.toml")
    slm = components.build_slm(cfg)
    set_peft_model_state_dict(slm, load_file(run / "adapters" / "slm" / "adapter_model.safetensors"))
    saved = adapter_to_ndarrays(slm)
    norm = np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in saved))
    out = {}
    for mode in ["as saved", *modes]:
        arrays = saved if mode == "as saved" else transport.decode(transport.encode(saved, mode), mode)
        load_adapter_ndarrays(slm, arrays)
        score = _scores(slm, cfg, "slm", f"eval SLM {mode}")  # the experiment's own scoring
        error = np.sqrt(sum(np.sum(np.square(a.astype(np.float64) - b)) for a, b in zip(arrays, saved))) / norm
        out[mode] = {"acc": score["acc"], "relative_error": float(error)}
        print(f"{run.name} {mode}: SLM acc {100 * score['acc']:.1f}, adapter rounding error {100 * error:.2f}%",
              flush=True)
    (run / "transport_rounding.json").write_text(json.dumps(out, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (with adapters/slm and config.toml)")
    p.add_argument("--modes", default="fp16,int8,int4", help="transports to round with (default: fp16,int8,int4)")
    args = p.parse_args()
    for run in args.runs:
        rounding_check(run, args.modes.split(","))


if __name__ == "__main__":
    main()
