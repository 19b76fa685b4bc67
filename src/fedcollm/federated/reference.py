"""The global adapter both sides hold, and how its changes travel.

A lossy transport (fp16, int8, int4) that rounded the whole adapter in every message would add
a rounding error of the whole adapter to the model at every round, and in both directions.
So, under a lossy transport, messages carry *changes* against a reference that server and
clients hold bit for bit alike:

- Downlink: the reference R starts at zeros and moves by one decoded change per round,
  R_v = R_(v-1) + decode(D_v) with D_v = encode(θ_v − R_(v-1)). The server sends a client the
  changes since the version it last confirmed holding (by replying), or, when that would be
  more bytes (or the changes are gone), R itself in fp32. Each message names the version it
  starts from and the CRC-32 of the R it leads to; the client checks it and refuses (a failed
  fit: next round it gets R whole) instead of training from a reference the server does not have.
- Uplink: a client sends encode(θ_k − R); the server adds R back. Under SecAgg+ the clients
  hand it these changes (the mean of changes plus R is the mean of the adapters), and so the
  range SecAgg+ must cover is a round's change, not the adapter.

So what the rounding loses is a share of one round's change, and what the server's rounding
lost last round is sent again with the next change: the server keeps its own adapter θ (the
strategy's SLM), and its next adapter is θ plus the clients' mean change (`carry`), so the
next change θ' − R holds θ − R as well (error feedback; without it each broadcast's rounding
would be lost for good, which 1- and 2-bit transports cannot afford). The clients' reference
never drifts from the server's R, and R is what the server scores and saves as the SLM.
A client's own rounding is not fed back: that residual would live only on the client, and a
client starts each round afresh from R (a restarted one could not rebuild it, so a resumed run
would differ from the uninterrupted one); fed back, it gave int1 nothing measurable
(results/traffic/, session 19). fp32 is exact:
it sends the adapter itself, whole, as Flower's differential-privacy wrappers and mods (which
clip and noise what travels) need.
"""

from __future__ import annotations

import zlib

import numpy as np
from flwr.common import ArrayRecord, ConfigRecord

from fedcollm.errors import FedCoLLMError
from fedcollm.federated import transport
from fedcollm.federated.validate import shape_problem

# Fit-config keys of a downlink message (the round's FitIns config).
FROM, STEPS, TO, CHECK = "reference_from", "reference_steps", "reference_version", "reference_crc32"
# The client's context.state records that hold its reference between rounds.
STATE_ARRAYS, STATE_META = "fedcollm.reference", "fedcollm.reference.meta"


def sends_changes(mode: str) -> bool:
    return mode != "fp32"


def crc32(arrays: list[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a, dtype=np.float32).tobytes(), crc)
    return crc


def _add(held: list[np.ndarray], change: list[np.ndarray]) -> list[np.ndarray]:
    """held + change, tensor by tensor; ValueError naming the first tensor that does not fit
    (validate.shape_problem: update_problem's words, as it never sees a change that fails here)."""
    if problem := shape_problem(change, held):
        raise ValueError(problem)
    return [np.add(h, c, dtype=np.float32) for h, c in zip(held, change)]


def uplink(arrays: list[np.ndarray], held: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """What a client encodes: its adapter's change against the reference, or (fp32) the adapter."""
    if not sends_changes(mode):
        return arrays
    return [np.subtract(a, h, dtype=np.float32) for a, h in zip(arrays, held)]


def carry(mean: list[np.ndarray], own: list[np.ndarray], held: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """The server's next adapter: its own one plus the clients' mean change, i.e. the mean of
    the clients' adapters (restored against R) plus own − R, what the rounding of the last
    broadcast left out of R, so that it travels with the next change (error feedback)."""
    if not sends_changes(mode):
        return mean
    return [np.add(m, np.subtract(o, h, dtype=np.float32), dtype=np.float32) for m, o, h in zip(mean, own, held)]


def restore(arrays: list[np.ndarray], held: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """The server's inverse of `uplink` on decoded fp32 arrays (one client's, or SecAgg+'s mean)."""
    return _add(held, arrays) if sends_changes(mode) else arrays


class ServerReference:
    """The server's side: the reference R, its recent changes, and which version each node holds."""

    def __init__(self, mode: str, held: list[np.ndarray] | None = None):
        """held: a reference restored from a checkpoint; no node is known to hold it, so each
        gets it whole first."""
        self.mode = mode
        self.held = [np.asarray(a, np.float32) for a in held] if held is not None else None
        self.version = 1 if held is not None else 0
        self.crc = crc32(self.held) if held is not None else 0
        self.changes: dict[int, list[np.ndarray]] = {}  # version v → D_v (encoded), recent ones
        self.nodes: dict[int, int] = {}  # node id → version it confirmed holding

    def publish(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Make `arrays` (the new global adapter) the next version; return R, what clients will hold."""
        arrays = [np.asarray(a, np.float32) for a in arrays]
        if not sends_changes(self.mode):
            self.held, self.changes = arrays, {}
        else:
            base = self.held if self.held is not None else [np.zeros_like(a) for a in arrays]
            wire = transport.encode(uplink(arrays, base, self.mode), self.mode)
            self.held = _add(base, transport.decode(wire, self.mode))
            self.changes[self.version + 1] = wire
        self.version += 1
        self.crc = crc32(self.held)
        # Keep only changes that can still be cheaper than R whole.
        whole, step = _nbytes(self.held), _nbytes(self.changes.get(self.version, []))
        keep = (whole - 1) // step if step else 0
        self.changes = {v: w for v, w in self.changes.items() if v > self.version - keep}
        return self.held

    def message(self, node: int) -> tuple[list[np.ndarray], dict]:
        """The arrays and fit config that bring `node` to the current version.

        The node then counts as holding nothing until it replies (`confirm`)."""
        start = self.nodes.pop(node, 0)
        steps = range(start + 1, self.version + 1)
        meta = {TO: self.version, CHECK: self.crc}
        if sends_changes(self.mode) and steps and all(v in self.changes for v in steps):
            arrays = [a for v in steps for a in self.changes[v]]
            if _nbytes(arrays) < _nbytes(self.held):
                return arrays, {**meta, FROM: start, STEPS: len(steps)}
        return list(self.held), {**meta, FROM: 0, STEPS: 0}

    def confirm(self, node: int) -> None:
        """`node` replied to this version's message: it holds this version."""
        self.nodes[node] = self.version


def _nbytes(arrays: list[np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays)


def receive(arrays: list[np.ndarray], config: dict, state, mode: str, who: str) -> list[np.ndarray]:
    """Client side: the reference R a downlink message leads to, checked and kept in `state`
    (the client's context.state) for the next round's changes."""
    if CHECK not in config:
        raise FedCoLLMError(f"{who}: the fit config names no reference ({CHECK}): a server of another "
                            "fedcollm version?")
    steps, start = int(config.get(STEPS, 0)), int(config.get(FROM, 0))
    if not steps:  # R whole, in fp32
        held = transport.decode(arrays, "fp32")
    else:
        if start == 0:
            held = None  # from zeros: shapes come with the first change
        elif STATE_META in state and int(state[STATE_META]["version"]) == start:
            held = state[STATE_ARRAYS].to_numpy_ndarrays()
        else:
            have = int(state[STATE_META]["version"]) if STATE_META in state else "none"
            raise FedCoLLMError(f"{who}: the server sent changes from reference version {start}, this client "
                                f"holds version {have} (restarted?); it gets the adapter whole next round")
        if len(arrays) % steps:
            raise ValueError(f"{who}: {len(arrays)} arrays do not split into {steps} changes")
        per = len(arrays) // steps
        for i in range(steps):
            change = transport.decode(arrays[i * per:(i + 1) * per], mode)
            held = _add(held if held is not None else [np.zeros_like(c) for c in change], change)
    if crc32(held) != int(config[CHECK]):
        raise FedCoLLMError(f"{who}: the reference rebuilt from the server's message (version {config[TO]}) "
                            "differs from the server's (CRC-32 mismatch); refusing to train from it")
    state[STATE_ARRAYS] = ArrayRecord(numpy_ndarrays=held)
    state[STATE_META] = ConfigRecord({"version": int(config[TO])})
    return held
