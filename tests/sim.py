"""Run the real Flower simulation in-process and record what the server sees."""

from __future__ import annotations

import sys

from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_to_proto, recorddict_to_proto
from ray import cloudpickle

from fedcollm.runs.simulation import run_simulation


def _sizes(msg) -> dict:
    """A reply's size as serialized for the wire (Flower's protobuf), its content alone, and the
    raw bytes of the arrays it carries."""
    return {"wire": len(message_to_proto(msg).SerializeToString()),
            "payload": len(recorddict_to_proto(msg.content).SerializeToString()),
            "arrays": sum(a.numpy().nbytes for rec in msg.content.array_records.values() for a in rec.values())}


def _masked_bytes(msg) -> int:
    """The bytes of SecAgg+'s masked vectors in a reply as received (0 in any other reply)."""
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return sum(len(b) for b in record[Key.MASKED_PARAMETERS]) if record and Key.MASKED_PARAMETERS in record else 0


def simulate(cfg, extra_mods=()) -> dict:
    """Run cfg; return per round the (num_examples, partition, arrays) the strategy's
    aggregate_fit got, every reply message the server received, the sizes of those that carried
    arrays, and of SecAgg+'s masked vectors as received. Run errors propagate."""
    for mod in extra_mods:  # Ray workers cannot import test modules: ship their code by value
        cloudpickle.register_pickle_by_value(sys.modules[mod.__module__])
    seen: dict = {"fit_inputs": {}, "replies": [], "reply_sizes": [], "masked_bytes": []}

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
            # Sizes now: Flower's workflow empties a reply's arrays once it has read them.
            seen["reply_sizes"].extend(_sizes(r) for r in replies if r.has_content() and r.content.array_records)
            seen["masked_bytes"].extend(n for n in map(_masked_bytes, replies) if n)
            return replies

        strategy.aggregate_fit = record_fit
        grid.send_and_receive = record_replies

    run_simulation(cfg, observe, extra_mods)
    return seen
