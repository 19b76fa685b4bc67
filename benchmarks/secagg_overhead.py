"""SecAgg+ cost, measured side by side: the same config and seed with plain and secure aggregation.

Prints, per mode, the fit stage time (configure_fit → aggregate_fit: client training plus the
aggregation protocol), the whole round time, bytes up/down per client per round, and then
the ratios secure/plain and the max abs difference of the round-1 aggregates (the same client
updates: the quantization error of SecAgg+ against exact FedAvg).

    python benchmarks/secagg_overhead.py [--preset default] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import numpy as np
from flwr.common import parameters_to_ndarrays

from fedcollm.config import load_config
from fedcollm.federated import transport
from fedcollm.runs.simulation import run_simulation


def measure(cfg) -> dict:
    marks: dict = {"fit": [], "round": [], "aggregate_1": None}

    def observe(strategy, grid):
        configure_fit, aggregate_fit, evaluate = strategy.configure_fit, strategy.aggregate_fit, strategy.evaluate
        state = {}

        def timed_configure(server_round, parameters, client_manager):
            state["t0"] = time.perf_counter()
            return configure_fit(server_round, parameters, client_manager)

        def timed_aggregate(rnd, results, failures):
            marks["fit"].append(time.perf_counter() - state["t0"])
            if rnd == 1:  # exact weighted mean of what arrived (secure: the aggregate itself)
                total = sum(r.num_examples for _, r in results)
                arrays = [parameters_to_ndarrays(r.parameters) for _, r in results]
                if not cfg.federation.secure_aggregation:  # plain: the transport's encoding (int4 by default)
                    arrays = [transport.decode(a, cfg.transport_mode()) for a in arrays]
                else:  # secure: the unmasked mean in SecAgg+'s units (federated/secagg.py), back to the adapter's
                    arrays = [[x * strategy.secagg_scale for x in a] for a in arrays]
                marks["aggregate_1"] = [sum(r.num_examples * a[i] for (_, r), a in zip(results, arrays)) / total
                                        for i in range(len(arrays[0]))]
            return aggregate_fit(rnd, results, failures)

        def timed_evaluate(server_round, parameters):
            out = evaluate(server_round, parameters)
            if server_round > 0:
                marks["round"].append(time.perf_counter() - state["t0"])
            return out

        strategy.configure_fit, strategy.aggregate_fit, strategy.evaluate = timed_configure, timed_aggregate, timed_evaluate

    summary = run_simulation(cfg, observe)
    return {"fit_s": marks["fit"], "round_s": marks["round"], "aggregate_1": marks["aggregate_1"],
            "error_bound": (summary["secure_aggregation"] or {}).get("max_abs_error_bound"),
            "bytes_up": summary["comm"]["bytes_up_per_client_round"],
            "bytes_down": summary["comm"]["bytes_down_per_client_round"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    base = load_config(preset=args.preset, overrides=["run.progress=false", *args.overrides])
    results = {}
    for secure in (False, True):
        cfg = dataclasses.replace(
            base, federation=dataclasses.replace(base.federation, secure_aggregation=secure),
            run=dataclasses.replace(base.run, out_dir=f"{base.run.out_dir}-bench-{'secure' if secure else 'plain'}"))
        results["secure" if secure else "plain"] = measure(cfg)
    p, s = results["plain"], results["secure"]
    # The first round also pays for actor start-up and model loading: report it separately.
    def steady(xs):
        return statistics.mean(xs[1:]) if len(xs) > 1 else xs[0]
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(p["aggregate_1"], s["aggregate_1"]))
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "preset": args.preset, "overrides": args.overrides, "rounds": base.federation.rounds,
        "plain": {k: v for k, v in p.items() if k != "aggregate_1"},
        "secure": {k: v for k, v in s.items() if k != "aggregate_1"},
        "fit_time_ratio_steady": steady(s["fit_s"]) / steady(p["fit_s"]),
        "round_time_ratio_steady": steady(s["round_s"]) / steady(p["round_s"]),
        "bytes_up_ratio": s["bytes_up"] / p["bytes_up"],
        "bytes_down_ratio": s["bytes_down"] / p["bytes_down"],
        "aggregate_max_abs_error": err,
    }
    print(json.dumps(report, indent=2))
    print(f"SecAgg+/plain: fit stage {report['fit_time_ratio_steady']:.3f}x, whole round "
          f"{report['round_time_ratio_steady']:.3f}x (goal <= 1.3x), bytes up {report['bytes_up_ratio']:.2f}x, "
          f"down {report['bytes_down_ratio']:.2f}x; aggregate max abs error {err:.2e} (SecAgg+'s worst case: "
          f"{s['error_bound']:.2e})")


if __name__ == "__main__":
    main()
