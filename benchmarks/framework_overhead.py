"""Framework overhead: the same client optimizer steps (a) in a bare PEFT + torch loop in one
process and (b) inside a FedCoLLM simulation round (Flower + Ray, real messages), side by side.

(b) is the fit stage (configure_fit → aggregate_fit) of round 2, after Ray and the actors'
model loading (paid once per run, in round 1). Server KD is switched off (distill.epochs = 0)
and evaluation happens outside the fit stage, so both sides do exactly the clients' SFT steps.
(a) runs the clients one after another with all cores; (b) runs them on Ray actors with
federation.client_cpus cores each.

    python benchmarks/framework_overhead.py [--preset default] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.runs.simulation import run_simulation
from fedcollm.train.sft import sft


def bare_loop(cfg) -> tuple[float, int]:
    torch.set_num_threads(os.cpu_count() or 1)
    model = components.build_slm(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    pad = components.pad_id(cfg, "slm")
    t0, steps = time.perf_counter(), 0
    for k in range(cfg.data.num_clients):
        part = components.client_examples(cfg, k)
        model.load_state_dict(initial, strict=False)  # every client starts from the global adapter
        steps += sft(model, part, epochs=cfg.client.local_epochs, lr=cfg.client.lr, batch_size=cfg.client.batch_size,
                     pad_id=pad, seed=k, device=components.device_of(cfg))["steps"]
    return time.perf_counter() - t0, steps


def simulated(cfg) -> float:
    fit_s: list[float] = []

    def observe(strategy, grid):
        configure_fit, aggregate_fit = strategy.configure_fit, strategy.aggregate_fit
        t = {}

        def timed_configure(server_round, parameters, client_manager):
            t["t0"] = time.perf_counter()
            return configure_fit(server_round, parameters, client_manager)

        def timed_aggregate(rnd, results, failures):
            fit_s.append(time.perf_counter() - t["t0"])
            return aggregate_fit(rnd, results, failures)

        strategy.configure_fit, strategy.aggregate_fit = timed_configure, timed_aggregate

    run_simulation(cfg, observe)
    return fit_s[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(preset=args.preset, overrides=[
        "run.progress=false", "distill.epochs=0", "federation.rounds=2", "data.eval_examples=8",
        *args.overrides])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=f"{cfg.run.out_dir}-bench-overhead"))
    bare_s, steps = bare_loop(cfg)
    sim_s = simulated(cfg)
    report = {"machine": f"{platform.machine()} cpus={os.cpu_count()}", "preset": args.preset,
              "overrides": args.overrides, "client_steps_per_round": steps,
              "bare_loop_s": bare_s, "simulation_fit_stage_s": sim_s, "ratio": sim_s / bare_s, "goal": 1.15}
    print(json.dumps(report, indent=2))
    print(f"simulation round / bare loop for {steps} client steps: {report['ratio']:.3f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
