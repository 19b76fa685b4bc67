"""The paper's methods, baselines and ablations, each a function `cfg → result` on cfg's split.

Every method sees the same data as FedCoLLM with the same config and seed (components builds the
split, the token ids and the initial adapters once per config):

- zero_shot:    the SLM and the LLM before any training (seed-independent: B = 0 in LoRA).
- standalone:   each client trains its SLM adapter on its own part only, for as many local steps
                as in FedCoLLM (rounds × local_epochs passes over its part, one optimizer).
- fedavg:       the federation without the server LLM: FedAvg of the client adapters, no KD.
- fedcollm:     the full method (mutual KD).
- kd_llm_to_slm / kd_slm_to_llm: one-way KD ablations (only the SLM / only the LLM learns
                from the other); lambda0: λ = 0 (both models SFT on the auxiliary part only).
- centralized:  the LLM fine-tuned on the auxiliary part and all client parts pooled, for
                rounds × local_epochs passes.

The federated methods are `fedcollm run` (Flower's simulation) in a child process; the others
reuse its training and evaluation components in this process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fedcollm import checkpoint, components
from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.eval import scoring
from fedcollm.eval.mcq import auto_batch_size
from fedcollm.models.lora import adapter_state
from fedcollm.train.memory import out_of_memory_advice, scoring_advice
from fedcollm.train.sft import sft

Result = dict  # {"slm": {"acc", "acc_norm"} or {"loss", "ppl"} | None, "llm": ... | None, extra keys per method}


def _scores(model, cfg: Config, which: str, desc: str) -> dict:
    """The SLM's or LLM's (`which`: its own tokenizer) figures on the evaluation set (acc and
    acc_norm, or loss and ppl), n, and what each item scored (scoring.score)."""
    data, device = components.server_data(cfg), components.device_of(cfg)
    with out_of_memory_advice(f"{desc}: scoring on {device}", scoring_advice(auto_batch_size(cfg.run.eval_batch_size, device))):
        return scoring.score(model, components.tokenizer(cfg, which), data.evals, data.eval_requests[which],
                             batch_size=cfg.run.eval_batch_size, device=device, progress=cfg.run.progress, desc=desc)


def check_multiple_choice(kind: str, cfg: Config, what: str) -> None:
    """`what` (the aux-size study, the traffic sweep, the dev search) chooses and compares by
    accuracy: refuse an evaluation set of prompt-completion records (Table 1 compares those by
    their loss)."""
    if kind != scoring.MCQ:
        raise FedCoLLMError(f"fedcollm experiment {what}: the evaluation set of {cfg.data.dataset} "
                            f"({cfg.data.eval_file or cfg.data.eval_split}) is {kind} data; {what} compares "
                            "accuracies, so it needs a multiple-choice evaluation set (Table 1, without it, "
                            "compares the methods by loss)")


def adapter_digest(model) -> str:
    """sha256 of the adapter tensors: equal digests mean bit-identical adapters."""
    h = hashlib.sha256()
    for key, t in adapter_state(model).items():
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _train_epochs(cfg: Config) -> int:
    return cfg.federation.rounds * cfg.client.local_epochs


def _sft(model, examples, cfg: Config, which: str, seed: int, desc: str, resume: Path | None) -> dict:
    c = cfg.client
    return sft(model, examples, epochs=_train_epochs(cfg), lr=c.lr, batch_size=c.batch_size,
               pad_id=components.pad_id(cfg, which), seed=seed, device=components.device_of(cfg),
               weight_decay=c.weight_decay, progress=cfg.run.progress, desc=desc, resume=resume,
               micro_batch_size=c.micro_batch_size)


def _in(workdir: Path | None, name: str) -> Path | None:
    """A file of the job's own folder (where a job cut short continues from), if it has one."""
    return None if workdir is None else Path(workdir) / name


def zero_shot(cfg: Config, workdir: Path) -> Result:
    return {"slm": _scores(components.build_slm(cfg), cfg, "slm", "zero-shot SLM"),
            "llm": _scores(components.build_llm(cfg), cfg, "llm", "zero-shot LLM")}


def standalone(cfg: Config, workdir: Path | None) -> Result:
    """Each client alone; the SLM result is the mean over clients, each client listed. A job cut
    short keeps the clients it finished (one file each) and the last epoch of the one it was in."""
    clients = []
    for k in range(cfg.data.num_clients):
        done = _in(workdir, f"standalone-client{k}.json")
        if done is not None and done.is_file():
            clients.append(json.loads(done.read_text()))
            continue
        examples = components.client_examples(cfg, k)
        model = components.build_slm(cfg)  # the same initial adapter FedCoLLM starts from
        stats = _sft(model, examples, cfg, "slm", seed=cfg.run.seed * 1_000_003 + k, desc=f"standalone client {k}",
                     resume=_in(workdir, f"standalone-client{k}.pt"))
        client = {"client": k, "examples": len(examples), "steps": stats["steps"],
                  "adapter_sha256": adapter_digest(model), **_scores(model, cfg, "slm", f"eval client {k}")}
        if done is not None:
            checkpoint.write_json(done, client)
        clients.append(client)
    mean = {m: sum(c[m] for c in clients) / len(clients) for m in scoring.metrics_of(clients[0])}
    # Per item: the mean over clients too (the share of clients that got it right; the summed
    # loss, on the same tokens for every client).
    for key in scoring.items_of(clients[0]):
        mean[key] = [sum(c[key][i] for c in clients) / len(clients) for i in range(len(clients[0][key]))]
        for c in clients:
            del c[key]
    return {"slm": mean, "llm": None, "clients": clients}


def centralized_examples(cfg: Config) -> list:
    """The auxiliary part and every client part, pooled (the LLM's tokenization): all the
    training data of the split."""
    return [*components.server_data(cfg).aux.llm,
            *(e for k in range(cfg.data.num_clients) for e in components.client_examples(cfg, k, "llm"))]


def centralized(cfg: Config, workdir: Path | None) -> Result:
    model = components.build_llm(cfg)
    examples = centralized_examples(cfg)
    stats = _sft(model, examples, cfg, "llm", seed=cfg.run.seed * 1_000_003 + 999, desc="centralized LLM",
                 resume=_in(workdir, "centralized.pt"))
    return {"slm": None, "llm": _scores(model, cfg, "llm", "eval centralized LLM"), "examples": len(examples),
            "steps": stats["steps"], "adapter_sha256": adapter_digest(model)}


def _federated(**distill) -> Callable[[Config, Path], Result]:
    def run(cfg: Config, workdir: Path) -> Result:
        run_cfg = dataclasses.replace(
            cfg, distill=dataclasses.replace(cfg.distill, **distill),
            run=dataclasses.replace(cfg.run, out_dir=str(workdir), eval_every=0))
        # `fedcollm run` in a child process: each run gets a fresh Ray and gives its memory back.
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir.with_suffix(".toml")
        config_file.write_text(run_cfg.to_toml())
        cmd = [sys.executable, "-m", "fedcollm.cli", "run", "--config", str(config_file)]
        state = checkpoint.load(workdir)
        if state is not None and state["config_digest"] == run_cfg.digest():
            cmd += ["--resume", str(workdir)]  # a run killed earlier continues after its last round
        else:
            cmd += ["--out", str(workdir)]
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise FedCoLLMError(f"experiment: `{shlex.join(cmd)}` failed with exit code {code} (its log is above)")
        summary = json.loads((workdir / "summary.json").read_text())
        items = summary.get("items", {})
        return {**{m: summary[m] and {**summary[m], **items.get(m, {})} for m in ("slm", "llm")},
                "comm": summary["comm"], "wall_s": summary["wall_s"], "run_dir": str(workdir),
                "code_version": summary.get("code_version"), "aux_examples": summary.get("aux_examples"),
                "privacy": summary.get("privacy", False)}

    return run


METHODS: dict[str, Callable[[Config, Path], Result]] = {
    "zero_shot": zero_shot,
    "standalone": standalone,
    "fedavg": _federated(enabled=False),
    "fedcollm": _federated(),
    "kd_llm_to_slm": _federated(llm_learns_from_slm=False),
    "kd_slm_to_llm": _federated(slm_learns_from_llm=False),
    "lambda0": _federated(kd_lambda=0.0),
    "centralized": centralized,
}
SEED_INDEPENDENT = {"zero_shot"}
LABELS = {
    "zero_shot": "Zero-shot",
    "standalone": "Standalone (mean of clients)",
    "fedavg": "FedAvg (clients only)",
    "fedcollm": "FedCoLLM",
    "kd_llm_to_slm": "FedCoLLM, KD LLM→SLM only",
    "kd_slm_to_llm": "FedCoLLM, KD SLM→LLM only",
    "lambda0": "FedCoLLM, λ = 0 (aux SFT only)",
    "centralized": "Centralized (LLM, all data)",
}

