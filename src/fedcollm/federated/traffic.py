"""Byte accounting from the Flower messages themselves, and a bound on every wait.

The server's workflows (plain FedAvg and SecAgg+ alike) talk to clients only through
`grid.send_and_receive`; wrapping the grid there counts every message's payload, per client,
whatever the protocol's number of stages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.common.serde import recorddict_to_proto


def payload_bytes(msg) -> int:
    """Wire size of a message's content (arrays, configs, metrics) in Flower's protobuf form.

    (RecordDict.count_bytes would be cheaper, but fails on SecAgg+'s empty ID lists in 1.42.)
    """
    if not msg.has_content():
        return 0
    return recorddict_to_proto(msg.content).ByteSize()


class CountingGrid:
    """A Grid that counts bytes down (server→client) and up (client→server) per node, and
    records every client that answered with an error or not at all (with the reason)."""

    def __init__(self, grid, timeout: float | None):
        self._grid = grid
        self._timeout = timeout
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)
        self.drops: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None):
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] += payload_bytes(m)
        # Flower waits forever by default: a silent client must not hang the server.
        replies = list(self._grid.send_and_receive(messages, timeout=timeout or self._timeout))
        answered = set()
        for r in replies:
            answered.add(r.metadata.src_node_id)
            self.up[r.metadata.src_node_id] += payload_bytes(r)
            if r.has_error():
                reason = str(r.error.reason).strip().splitlines()
                self.drops.append({"node": r.metadata.src_node_id, "reason": (reason[-1] if reason else "error")[:300]})
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.drops.append({"node": m.metadata.dst_node_id,
                                   "reason": f"no reply within {timeout or self._timeout:g} s"})
        return replies

    def take(self) -> tuple[dict[int, int], dict[int, int], list[dict]]:
        """Bytes counted since the last call, per node (down, up), and the clients dropped."""
        down, up, drops = dict(self.down), dict(self.up), list(self.drops)
        self.down.clear()
        self.up.clear()
        self.drops.clear()
        return down, up, drops
