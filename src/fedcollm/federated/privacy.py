"""Client-level differential privacy with Flower's mechanisms and an RDP accountant.

Mechanism (DP-FedAvg, McMahan et al. 2018): every sampled client's update θ_k − θ_global is
clipped to L2 norm C, the server averages the m clipped updates with equal weights and adds
Gaussian noise of standard deviation σ·C/m to the mean. Two modes, both Flower's own code:
- central-client-clipping: the clients clip (flwr's `fixedclipping_mod`, asked for by the
  server's `DifferentialPrivacyClientSideFixedClipping` wrapper). The server never sees an
  unclipped update, so this is the mode that combines with SecAgg+ (clipping happens before
  the masks). The guarantee trusts the clients to run the mod.
- central-server-clipping: the server clips every update it receives
  (`DifferentialPrivacyServerSideFixedClipping`); it sees the updates, so not with SecAgg+.

Equal weights: with example-count weights a large client's update would move the mean by more
than C/m, which the noise is not calibrated for; under DP each client weighs 1.

What the guarantee covers: (ε, δ) client-level DP of everything derived from the clients'
data, i.e. the sequence of noised aggregates. The server's KD and the LLM are post-processing of
those aggregates plus the server's own auxiliary data, so the adapters it broadcasts, the LLM
and every score inherit the same (ε, δ) with respect to any one client's data; the server's
auxiliary data is not protected (it is the server's own).

Accounting: the sampled Gaussian mechanism, m of K clients a round (sampling rate q = m / K,
treated as Poisson sampling, the usual approximation for sampling a fixed number without
replacement; q = 1 needs no approximation), composed over the rounds with Opacus's RDP
accountant (Mironov 2017; Mironov, Talwar, Zhang 2019) and converted to (ε, δ) as Opacus does.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # what the client-side wrapper sends

from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # RDP orders α (Opacus' defaults)


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after `rounds` rounds of the sampled Gaussian mechanism (∞ without noise)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # noqa: PLC0415

    if noise_multiplier <= 0:
        return float("inf")
    if rounds == 0:
        return 0.0
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def solve_noise(target_epsilon: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The smallest σ (to 0.1%) whose ε after `rounds` rounds is at most target_epsilon."""
    lo, hi = 0.0, 1.0
    while epsilon(hi, sample_rate, rounds, delta) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise FedCoLLMError(f"config: privacy.target_epsilon = {target_epsilon:g} needs a noise multiplier "
                                "above 10^4; raise the target or lower federation.rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon(mid, sample_rate, rounds, delta) > target_epsilon else (lo, mid)
    return hi


@dataclass(frozen=True)
class Privacy:
    mode: str
    noise_multiplier: float  # σ, given or solved from target_epsilon
    clipping_norm: float  # C
    delta: float
    clients_per_round: int  # m: the noise std on the mean is σ·C/m
    sample_rate: float  # q = m / K

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def describe(self) -> dict:
        return {"mode": self.mode, "noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                "delta": self.delta, "clients_per_round": self.clients_per_round, "sample_rate": self.sample_rate,
                "noise_std_on_mean": self.noise_multiplier * self.clipping_norm / self.clients_per_round,
                "accountant": "RDP (Opacus), sampled Gaussian mechanism, client level"}


def clients_per_round(cfg: Config) -> int:
    return max(1, round(cfg.federation.fraction_fit * cfg.data.num_clients))


def resolve(cfg: Config) -> Privacy | None:
    """The privacy settings of a run (σ solved from a target ε), or None when off."""
    p = cfg.privacy
    if p.mode == "off":
        return None
    m = clients_per_round(cfg)
    q = m / cfg.data.num_clients
    sigma = p.noise_multiplier or solve_noise(p.target_epsilon, q, cfg.federation.rounds, p.delta)
    return Privacy(p.mode, sigma, p.clipping_norm, p.delta, m, q)


def wrap(averager, privacy: Privacy | None):
    """Flower's DP wrapper around the averaging strategy (or the strategy itself when off)."""
    if privacy is None:
        return averager
    cls = (DifferentialPrivacyClientSideFixedClipping if privacy.mode == "central-client-clipping"
           else DifferentialPrivacyServerSideFixedClipping)
    return cls(averager, privacy.noise_multiplier, privacy.clipping_norm, privacy.clients_per_round)


def asked_to_clip(config) -> bool:
    """The server's client-side DP wrapper asked this client to clip (fit config)."""
    return KEY_CLIPPING_NORM in config


def clipping_mod(msg, context, call_next):
    """Flower's fixedclipping_mod on the training messages whose config asks for clipping;
    every other message passes straight through (one ClientApp for every mode)."""
    if msg.metadata.message_type == MessageType.TRAIN:
        if asked_to_clip(compat.recorddict_to_fitins(msg.content, keep_input=True).config):
            return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
