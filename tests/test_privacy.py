"""Client-level differential privacy: clipping bounds every contribution by C, the noise has
standard deviation σ·C/m, the accountant reproduces published numbers, bad settings are refused,
and it runs end to end with SecAgg+."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from flwr.app import Message, Metadata
from flwr.app.message_type import MessageType
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedcollm.config import load_config
from fedcollm.errors import FedCoLLMError
from fedcollm.federated import privacy
from fedcollm.federated.strategy import Averager, FedCoLLMStrategy
from fedcollm.federated.transport import decode
from fedcollm.models.lora import adapter_to_ndarrays
from fedcollm.report import Recorder


def _norm(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


# --- accountant ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,epochs,published", [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)])
def test_accountant_reproduces_tf_privacys_published_epsilons(sigma, epochs, published):
    """TensorFlow Privacy's MNIST DP-SGD table (tutorials/README.md): 60,000 examples, batches of
    256, δ = 1e-5. It converts RDP to ε with the classical bound ε = min_α RDP(α) + log(1/δ)/(α−1);
    the ε we report uses Opacus' tighter conversion of the same RDP curve, never larger."""
    from opacus.accountants.analysis.rdp import compute_rdp  # noqa: PLC0415

    q, steps = 256 / 60000, epochs * 60000 // 256
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=privacy.ORDERS)
    classical = min(r + math.log(1 / 1e-5) / (a - 1) for a, r in zip(privacy.ORDERS, rdp))
    assert classical == pytest.approx(published, abs=0.015)
    assert privacy.epsilon(sigma, q, steps, 1e-5) <= classical


def test_solved_noise_meets_the_target():
    sigma = privacy.solve_noise(2.0, 1.0, 3, 1e-5)
    assert privacy.epsilon(sigma, 1.0, 3, 1e-5) <= 2.0 < privacy.epsilon(sigma * 0.99, 1.0, 3, 1e-5)
    assert privacy.epsilon(0.0, 1.0, 3, 1e-5) == float("inf")


# --- clipping and noise ----------------------------------------------------------------------

def _train_message(fit_ins: FitIns) -> Message:
    meta = Metadata(run_id=0, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                    created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=compat.fitins_to_recorddict(fit_ins, True), metadata=meta)


def test_client_side_mod_scales_a_huge_update_to_exactly_c():
    global_adapter = [np.full((4, 3), 0.5, np.float32), np.zeros(5, np.float32)]
    trained = [a + 100.0 for a in global_adapter]
    fit_ins = FitIns(ndarrays_to_parameters(global_adapter), {KEY_CLIPPING_NORM: 2.0, "round": 1})
    msg = _train_message(fit_ins)

    def client(m, _context):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(trained), 1, {})
        return Message(compat.fitres_to_recorddict(res, True), reply_to=m)

    out = privacy.clipping_mod(msg, None, client)
    sent = parameters_to_ndarrays(compat.recorddict_to_fitres(out.content, True).parameters)
    update = [s - g for s, g in zip(sent, global_adapter)]
    assert _norm(update) == pytest.approx(2.0, rel=1e-6)
    # the direction is kept: every coordinate moved by the same amount
    assert np.allclose(np.concatenate([u.ravel() for u in update]), 2.0 / math.sqrt(17), rtol=1e-5)


def test_client_side_mod_passes_messages_that_ask_for_no_clipping():
    fit_ins = FitIns(ndarrays_to_parameters([np.zeros(3, np.float32)]), {"round": 1})
    msg = _train_message(fit_ins)
    sentinel = object()
    assert privacy.clipping_mod(msg, None, lambda m, c: sentinel) is sentinel


def _fit_results(updates):
    return [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 1, {})) for u in updates]


def test_server_side_clipping_bounds_each_contribution_by_c(smoke_cfg, tmp_path):
    cfg = load_config(preset="smoke", overrides=[
        *_overrides(smoke_cfg), 'privacy.mode="central-server-clipping"', "privacy.noise_multiplier=1e-9",
        "privacy.clipping_norm=0.5", "federation.min_clients=4"])
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, epochs=0),
                              run=dataclasses.replace(cfg.run, out_dir=str(tmp_path)))
    strategy = FedCoLLMStrategy(cfg, Recorder(tmp_path, echo=False))
    g = adapter_to_ndarrays(strategy.slm)
    global_params = strategy.initialize_parameters(None)  # DP's fp32: the adapter as it is
    strategy.aggregator.configure_fit(1, global_params, _Manager(4))  # the wrapper keeps θ_global
    rng = np.random.default_rng(0)
    small = [[a + rng.normal(scale=1e-4, size=a.shape).astype(np.float32) for a in g] for _ in range(3)]
    huge = [a + 10.0 for a in g]
    results = [(_Manager(4).clients[str(k)], dataclasses.replace(r, metrics={"partition": k}))
               for k, (_, r) in enumerate(_fit_results([*small, huge]))]
    strategy.aggregate_fit(1, results, [])
    got = adapter_to_ndarrays(strategy.slm)
    huge_clipped = [a + (h - a) * (0.5 / _norm([hh - aa for hh, aa in zip(huge, g)])) for a, h in zip(g, huge)]
    expected = [(s0 + s1 + s2 + hc) / 4 for s0, s1, s2, hc in zip(*small, huge_clipped)]
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, atol=1e-5)
    assert strategy.round_stats["epsilon"] > 0


class _Manager:
    """Four connected clients, for the wrappers' configure_fit."""

    def __init__(self, n):
        self.clients = {str(i): type("P", (), {"cid": str(i), "node_id": i})() for i in range(n)}

    def num_available(self):
        return len(self.clients)

    def wait_for(self, n, timeout=0):
        return True

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return list(self.clients.values())[:num_clients]


def test_noise_has_std_sigma_c_over_m():
    sigma, c, m = 1.3, 0.7, 4
    averager = Averager(lambda res: parameters_to_ndarrays(res.parameters), uniform=True,
                        fraction_fit=1.0, min_fit_clients=m, min_available_clients=m)
    dp = privacy.wrap(averager, privacy.Privacy("central-client-clipping", sigma, c, 1e-5, m, 1.0))
    zeros = [np.zeros(2000, np.float32)]
    np.random.seed(0)
    draws = np.concatenate([parameters_to_ndarrays(dp.aggregate_fit(1, _fit_results([zeros] * m), [])[0])[0]
                            for _ in range(100)])
    expected = sigma * c / m
    # 200,000 draws: the sample std is within ~0.5% of the true one; its mean is ~0.
    assert draws.std() == pytest.approx(expected, rel=0.02)
    assert abs(draws.mean()) < 5 * expected / math.sqrt(draws.size)


# --- settings that break the guarantee are refused ------------------------------------------

def _overrides(cfg):
    return [f'data.dataset="{cfg.data.dataset}"', f'data.train_file="{cfg.data.train_file}"',
            f'data.eval_file="{cfg.data.eval_file}"', "run.progress=false"]


@pytest.mark.parametrize("extra,message", [
    (['privacy.mode="central-client-clipping"', "privacy.noise_multiplier=1.0"],
     "config: privacy.mode = 'central-client-clipping' needs privacy.clipping_norm > 0 (without clipping an "
     "update's influence is unbounded: no guarantee)"),
    (['privacy.mode="central-client-clipping"', "privacy.clipping_norm=1.0", "federation.min_clients=4"],
     "config: privacy.mode = 'central-client-clipping' with noise 0 gives ε = ∞; set privacy.noise_multiplier > 0 "
     "or a finite privacy.target_epsilon > 0"),
    (['privacy.mode="central-client-clipping"', "privacy.clipping_norm=1.0", "privacy.noise_multiplier=1.0"],
     "config: privacy: federation.min_clients = 1 would let a round average fewer than the 4 sampled clients the "
     "noise is calibrated for; set federation.min_clients = 4"),
    (['privacy.mode="central-server-clipping"', "privacy.clipping_norm=1.0", "privacy.noise_multiplier=1.0",
      "federation.min_clients=4", "federation.secure_aggregation=true"],
     "config: privacy.mode = 'central-server-clipping' needs the server to see each update, which secure "
     "aggregation prevents; use 'central-client-clipping' with SecAgg+"),
    (['privacy.mode="central-client-clipping"', "privacy.clipping_norm=1.0", "privacy.noise_multiplier=1.0",
      "federation.min_clients=4", 'federation.transport="int8"'],
     "config: privacy needs federation.transport = 'fp32' or 'auto' (got 'int8'): the clipping bound must hold on the "
     "values sent, and a lossy encoding re-rounds them"),
    (['privacy.mode="central-client-clipping"', "privacy.clipping_norm=1.0", "privacy.noise_multiplier=1.0",
      "privacy.target_epsilon=2.0", "federation.min_clients=4"],
     "config: set privacy.noise_multiplier or privacy.target_epsilon, not both"),
])
def test_settings_without_a_guarantee_are_refused(extra, message):
    with pytest.raises(FedCoLLMError) as err:
        load_config(preset="smoke", overrides=extra)
    assert str(err.value) == message


def test_off_is_the_plain_averager(smoke_cfg, tmp_path):
    strategy = FedCoLLMStrategy(smoke_cfg, Recorder(tmp_path, echo=False))
    assert strategy.privacy is None and strategy.aggregator is strategy.averager
    assert not strategy.averager.uniform


# --- end to end with SecAgg+ ---------------------------------------------------------------------

def test_privacy_with_secure_aggregation_end_to_end(smoke_cfg, tmp_path):
    """Clients clip to C = 0.01 before SecAgg+ masks their update, the server adds noise to the
    unmasked mean: the global adapter moves by at most C (+ the tiny noise) a round, far less
    than the same round without DP, and the report states ε."""
    from sim import simulate  # noqa: PLC0415

    base = [*_overrides(smoke_cfg), "federation.rounds=1", "data.max_train_examples=50"]
    plain = load_config(preset="smoke", overrides=[*base, f'run.out_dir="{tmp_path / "plain"}"'])
    dp = load_config(preset="smoke", overrides=[
        *base, f'run.out_dir="{tmp_path / "dp"}"', "federation.secure_aggregation=true",
        'privacy.mode="central-client-clipping"', "privacy.clipping_norm=0.01", "privacy.noise_multiplier=1e-6",
        "federation.min_clients=4"])
    from fedcollm import components  # noqa: PLC0415

    moved = {}  # how far what the server received moved from the initial global adapter
    for name, cfg in (("plain", plain), ("dp", dp)):
        _, _, arrays = simulate(cfg)["fit_inputs"][1][0]  # plain: client 0's update; dp: the SecAgg+ mean
        if cfg.federation.secure_aggregation:  # DP: fp32, the adapter itself
            g0 = adapter_to_ndarrays(components.build_slm(cfg))
            moved[name] = _norm([a.astype(np.float64) - b for a, b in zip(arrays, g0)])
        else:  # the plain run's wire encoding (int4 by default): the change itself
            moved[name] = _norm([a.astype(np.float64) for a in decode(arrays, cfg.transport_mode())])
    assert moved["dp"] <= 0.01 + 1e-3 < moved["plain"]
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "central-client-clipping"
    assert 0 < summary["privacy"]["epsilon"] < float("inf") and summary["privacy"]["epsilon_per_round"]["1"] > 0
    assert summary["secure_aggregation"]["max_weight"] == 1
    assert "(ε, δ) = (" in (tmp_path / "dp" / "report.md").read_text()
