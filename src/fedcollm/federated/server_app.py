"""The server: one legacy-workflow round loop for plain and secure aggregation alike.

Flower 1.42's SecAgg+ exists only on the legacy workflow API, so the whole app uses it:
`DefaultWorkflow` with `SecAggPlusWorkflow` as its fit workflow when secure aggregation is on.
The strategy's `aggregate_fit` receives the (unmasked) aggregate either way and runs the KD.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from fedcollm import checkpoint
from fedcollm.config import Config, check_files
from fedcollm.crash import maybe_kill
from fedcollm.errors import FedCoLLMError
from fedcollm.federated import secagg
from fedcollm.federated.app_config import config_from_run_config
from fedcollm.federated.strategy import FedCoLLMStrategy
from fedcollm.federated.traffic import CountingGrid
from fedcollm.models.lora import adapter_numel, adapter_to_ndarrays, base_numel
from fedcollm.report import Recorder, build_summary, write_outputs
from fedcollm.version import code_version


def run_server(grid, context, cfg: Config, observe=None) -> dict:
    """Run all rounds, then write the outputs from the last good state.

    `observe(strategy, grid)` is called before the first round (tests instrument what the
    server sees through it). Raises FedCoLLMError, after writing the outputs, if a round failed.
    """
    t0 = time.time()
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = _resume_state(cfg, out)
    (out / "config.toml").write_text(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=False)).to_toml())
    recorder = Recorder(out, rows=resume["rows"] if resume else ())
    counting = CountingGrid(grid, cfg.federation.round_timeout)
    strategy = FedCoLLMStrategy(cfg, recorder, counting, resume)
    secure = _secure_settings(cfg, strategy) if cfg.federation.secure_aggregation else None
    if observe is not None:
        observe(strategy, counting)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.federation.rounds - strategy.offset),
                           strategy=strategy)
    fit_workflow = secagg.make_fit_workflow(cfg, strategy.max_examples) if secure else None
    # Under SecAgg+ the workflow reads masked vectors unpacked from the clients' bits (counted
    # as they travelled); plain rounds see the counting grid itself.
    DefaultWorkflow(fit_workflow=fit_workflow)(secagg.UnpackingGrid(counting) if secure else counting, legacy)
    strategy.rounds_bar.close()
    # tests: cut short after the last round's checkpoint, before the outputs
    maybe_kill("outputs", recorder.rows[-1]["round"] if recorder.rows else 0)
    strategy.score_last_state()
    strategy.hold_reference()
    strategy.slm.save_pretrained(out / "adapters" / "slm")
    if strategy.llm is not None:
        strategy.llm.save_pretrained(out / "adapters" / "llm")
    full = base_numel(strategy.slm)
    comm = {"adapter_params": adapter_numel(strategy.slm), "full_slm_params": full,
            "full_slm_fp32_bytes": 4 * full, "transport": cfg.transport_mode()}
    summary = build_summary(recorder.rows, comm, {
        "dataset": cfg.data.dataset, "eval_split": cfg.data.eval_split, "eval_file": cfg.data.eval_file or None,
        "num_clients": cfg.data.num_clients, "aux_examples": len(strategy.data.aux.llm), "llm_model": cfg.model.llm if cfg.distill.enabled else None,
        "slm_model": cfg.model.slm or f"{cfg.model.llm} layers 0-{cfg.model.slm_keep_first - 1} + last {cfg.model.slm_keep_last}",
        "secure_aggregation": secure or False, "seed": cfg.run.seed, "stopped": strategy.stopped,
        "failed_rounds": recorder.failed, "config_digest": cfg.digest(), "wall_s": time.time() - t0,
        "server_device": str(strategy.device), "code_version": code_version(),
        "privacy": _privacy_summary(strategy, recorder.rows), "items": strategy.last_items})
    write_outputs(out, recorder.rows, summary, _command())
    if strategy.stopped:
        raise FedCoLLMError(f"run stopped in round {strategy.failed_round}: {strategy.stopped}; "
                            f"outputs from the last good round are in {out}")
    return summary


def _privacy_summary(strategy: FedCoLLMStrategy, rows: list[dict]) -> dict | bool:
    """The DP settings, ε after every completed round, and ε at the end (False when off)."""
    if strategy.privacy is None:
        return False
    per_round = {r["round"]: r["epsilon"] for r in rows if "epsilon" in r}
    return {**strategy.privacy.describe(), "epsilon_per_round": per_round,
            "epsilon": per_round[max(per_round)] if per_round else 0.0}


def _command() -> str:
    """The command that started this run, for the report."""
    if Path(sys.argv[0]).name in ("fedcollm", "cli.py", "__main__.py"):
        return shlex.join(["fedcollm", *sys.argv[1:]])
    return "flwr run (ServerApp of a Flower deployment or `flwr run .`)"


def _resume_state(cfg: Config, out: Path) -> dict | None:
    """The checkpoint to continue from (run.resume), or None after clearing a stale one."""
    if not cfg.run.resume:
        (out / checkpoint.NAME).unlink(missing_ok=True)
        return None
    state = checkpoint.load(out)
    if state is None:
        raise FedCoLLMError(f"--resume: no {checkpoint.NAME} in {out}")
    print(f"[fedcollm] resuming {out} after round {state['round']}", flush=True)
    return state


def _secure_settings(cfg: Config, strategy: FedCoLLMStrategy) -> dict:
    """SecAgg+ parameters as reported, after checking that the initial adapter fits the range,
    the masked sum fits Flower's largest modulus, and no client's weight rounds to 0."""
    f, levels, w = cfg.federation, cfg.secagg_levels(), strategy.max_examples
    secagg.check_in_range(adapter_to_ndarrays(strategy.slm), f.secagg_clipping_range / 2,
                          "the initial global adapter (needs headroom to half the range)")
    mod = secagg.modulus(cfg.data.num_clients, levels)
    if mod > 2**32:
        raise FedCoLLMError(f"config: data.num_clients = {cfg.data.num_clients} × federation.secagg_quantization_range "
                            f"= {levels} needs a SecAgg+ modulus of {mod}, above Flower's 2^32; use fewer levels")
    # The server knows the parts in simulation (None: a deployment whose clients hold their own
    # files); under DP every client weighs 1.
    sizes = strategy.data.client_sizes if not strategy.privacy else [1] * cfg.data.num_clients
    for k, n in enumerate(sizes or ()):
        secagg.check_weight(n, w, levels, f"config: client {k}")
    return {"protocol": "SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow)",
            "clipping_range": f.secagg_clipping_range, "quantization_range": levels, "modulus": mod,
            "bits_per_value": mod.bit_length() - 1, "value_scale": strategy.secagg_scale,
            "num_shares": f.secagg_num_shares, "reconstruction_threshold": f.secagg_reconstruction_threshold,
            "max_weight": w, "timeout_s": f.round_timeout,
            "weights_as_sent": secagg.weights_as_sent(list(sizes), w, levels) if sizes else None,
            "max_abs_error_bound": secagg.error_bound(cfg, list(sizes), w) if sizes else None}


def make_server_app(cfg: Config | None = None, observe=None) -> ServerApp:
    """A ServerApp bound to `cfg`, or (None) reading it from the run config (`flwr run`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        c = cfg or config_from_run_config(context.run_config)
        check_files(c)
        run_server(grid, context, c, observe)

    return server_app


app = make_server_app()
