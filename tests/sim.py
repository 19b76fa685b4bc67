"""Run the real Flower simulation in-process and record what the server sees."""

from __future__ import annotations

import sys

from flwr.common import parameters_to_ndarrays
from ray import cloudpickle

from fedcollm.runs.simulation import run_simulation


def simulate(cfg, extra_mods=()) -> dict:
    """Run cfg; return per round the (num_examples, partition, arrays) the strategy's
    aggregate_fit got, and every reply message the server received. Run errors propagate."""
    for mod in extra_mods:  # Ray workers cannot import test modules: ship their code by value
        cloudpickle.register_pickle_by_value(sys.modules[mod.__module__])
    seen: dict = {"fit_inputs": {}, "replies": []}

    def observe(strategy, grid):
        aggregate_fit, send_and_receive = strategy.aggregate_fit, grid.send_and_receive

        def record_fit(rnd, results, failures):
            seen["fit_inputs"][rnd] = [
                (r.num_examples, r.metrics.get("partition"), parameters_to_ndarrays(r.parameters))
                for _, r in results]
            return aggregate_fit(rnd, results, failures)

        def record_replies(messages, *, timeout=None):
            replies = send_and_receive(messages, timeout=timeout)
            seen["replies"].extend(replies)
            return replies

        strategy.aggregate_fit = record_fit
        grid.send_and_receive = record_replies

    run_simulation(cfg, observe, extra_mods)
    return seen
