"""The reference both sides hold: lossy transports send changes against it, and a client that
missed rounds, lost its state or got a damaged message is brought back or refuses."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import RecordDict

from fedcollm.errors import FedCoLLMError
from fedcollm.federated import reference, transport
from fedcollm.federated.reference import ServerReference, receive


def _walk(rounds: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Global adapters over rounds: a LoRA-like start (A large, B zero), then small steps."""
    rng = np.random.default_rng(seed)
    theta = [rng.normal(0, 0.3, (8, 96)).astype(np.float32), np.zeros((96, 8), np.float32)]
    out = []
    for _ in range(rounds):
        out.append(theta)
        theta = [t + rng.normal(0, 0.01, t.shape).astype(np.float32) for t in theta]
    return out


def _max_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4", "int2", "int1"])
def test_a_client_that_replies_every_round_gets_one_change_and_holds_the_servers_reference(mode):
    server, state = ServerReference(mode), RecordDict()
    thetas = _walk(5)
    for rnd, theta in enumerate(thetas, 1):
        held = server.publish(theta)
        arrays, config = server.message(node=7)
        assert config[reference.STEPS] == 1 and config[reference.FROM] == rnd - 1
        assert sum(a.nbytes for a in arrays) == sum(a.nbytes for a in transport.encode(theta, mode))
        got = receive(arrays, config, state, mode, "client 0")
        assert all(np.array_equal(g, h) for g, h in zip(got, held)), "bit for bit the server's reference"
        server.confirm(7)
    # Rounding a change, not the adapter: after the first round the reference is far closer to
    # the adapter than the transport's rounding of the adapter itself. (1 and 2 bits round a
    # change coarsely too: what they leave out shrinks by a share each round, not at once.)
    whole_rounding = _max_error(transport.decode(transport.encode(thetas[-1], mode), mode), thetas[-1])
    assert _max_error(held, thetas[-1]) < (0.2 if mode in ("fp16", "int8", "int4") else 0.8) * whole_rounding


def test_uplink_sends_the_change_and_the_server_adds_the_reference_back():
    theta0, theta1 = _walk(2)
    held = transport.decode(transport.encode(theta0, "int4"), "int4")
    wire = transport.encode(reference.uplink(theta1, held, "int4"), "int4")
    back = reference.restore(transport.decode(wire, "int4"), held, "int4")
    change_rounding = _max_error(transport.decode(wire, "int4"), [a - h for a, h in zip(theta1, held)])
    assert _max_error(back, theta1) <= change_rounding + 1e-6
    assert _max_error(back, theta1) < 0.2 * _max_error(held, theta0)  # the adapter's own rounding


def test_a_change_of_the_wrong_shape_is_refused_by_name():
    """The server adds R back before validate.update_problem runs: the refusal names the tensor,
    as update_problem would (it was once "a change of 2 tensors does not fit the reference's 2")."""
    held = _walk(1)[0]
    with pytest.raises(ValueError, match=r"^tensor 1 has shape \(8, 96\), expected \(96, 8\)$"):
        reference.restore([held[0], np.zeros((8, 96), np.float32)], held, "int4")
    with pytest.raises(ValueError, match=r"^1 adapter tensors, expected 2$"):
        reference.restore(held[:1], held, "int8")


def test_fp32_sends_the_adapter_whole_and_exact():
    server, state = ServerReference("fp32"), RecordDict()
    for theta in _walk(3):
        server.publish(theta)
        arrays, config = server.message(node=1)
        assert config[reference.STEPS] == 0
        assert all(np.array_equal(g, t) for g, t in zip(receive(arrays, config, state, "fp32", "c"), theta))
        server.confirm(1)
        assert reference.uplink(theta, theta, "fp32") is theta and reference.restore(theta, None, "fp32") is theta


def test_a_client_that_missed_rounds_gets_the_changes_it_missed_or_the_reference_whole():
    server, states = ServerReference("int8"), {n: RecordDict() for n in (1, 2)}
    thetas = _walk(6)
    for rnd, theta in enumerate(thetas[:2], 1):  # both nodes take part in rounds 1 and 2
        server.publish(theta)
        for n in (1, 2):
            receive(*server.message(n), states[n], "int8", f"node {n}")
            server.confirm(n)
    server.publish(thetas[2])
    arrays, config = server.message(1)  # node 1 replies in round 3; node 2 sits it out
    receive(arrays, config, states[1], "int8", "node 1")
    server.confirm(1)
    held = server.publish(thetas[3])
    arrays, config = server.message(2)  # node 2 is two versions behind: two int8 changes
    assert (config[reference.FROM], config[reference.STEPS]) == (2, 2)
    assert all(np.array_equal(g, h) for g, h in zip(receive(arrays, config, states[2], "int8", "n2"), held))
    # A node the server never heard from, once the changes since zeros would outweigh fp32:
    for theta in thetas[4:]:
        held = server.publish(theta)
    arrays, config = server.message(99)
    assert config[reference.STEPS] == 0 and all(a.dtype == np.float32 for a in arrays)
    assert all(np.array_equal(g, h) for g, h in zip(receive(arrays, config, RecordDict(), "int8", "n99"), held))


def test_a_node_that_did_not_reply_counts_as_holding_nothing():
    server = ServerReference("int4")
    for theta in _walk(2):
        server.publish(theta)
        server.message(3)  # sent, never confirmed (crashed or timed out)
    _, config = server.message(3)
    assert config[reference.FROM] == 0 and config[reference.STEPS] == 2


def test_a_client_without_the_named_reference_refuses():
    server, state = ServerReference("int4"), RecordDict()
    for theta in _walk(2):
        server.publish(theta)
        receive(*server.message(5), state, "int4", "client 5")
        server.confirm(5)
    server.publish(_walk(3)[2])
    arrays, config = server.message(5)
    with pytest.raises(FedCoLLMError, match=r"client 5: the server sent changes from reference version 2, "
                                            r"this client holds version none \(restarted\?\)"):
        receive(arrays, config, RecordDict(), "int4", "client 5")  # its state was lost
    damaged = [arrays[0].copy(), *arrays[1:]]
    damaged[0][0] ^= 0x11  # one packed byte: two int4 values
    with pytest.raises(FedCoLLMError, match=r"client 5: the reference rebuilt from the server's message "
                                            r"\(version 3\) differs from the server's \(CRC-32 mismatch\)"):
        receive(damaged, config, state, "int4", "client 5")


def test_a_resumed_server_sends_its_reference_whole_first():
    theta = _walk(1)[0]
    server = ServerReference("int4", held=theta)
    again = server.publish(theta)  # no change: int4 sends zeros, which it rounds exactly
    assert all(np.array_equal(a, t) for a, t in zip(again, theta))
    arrays, config = server.message(0)
    assert config[reference.STEPS] == 0
    assert all(np.array_equal(g, t) for g, t in zip(receive(arrays, config, RecordDict(), "int4", "c"), theta))
