"""What a run is made of, built once per process and cached: data, split, tokenizer, models.

The federated apps, the baselines and the tests all build their pieces here, so the same config
gives the same split, the same token ids and the same initial adapters everywhere. Ray actors and
the server keep these between rounds (no reload, no re-tokenization per round).

Tokenizers: the LLM's, and the SLM's own when it comes from another source with another
vocabulary (then every piece of data is tokenized, and every conversation rendered by the chat
template, of the model that reads it, and the server's KD aligns the two: train/align.py).

Who holds which data:
- the server (`server_data`): the auxiliary part and the evaluation split. With data.aux_file
  it never opens the training split; without, it reads the training file only to compute the
  shared split (as every client does) and tokenizes only the auxiliary part.
- a client (`client_examples`): its own part of the split, or its own file.

Models: a process holds each base model's frozen weights once. The LLM's base is loaded once and
every LLM or pruned-SLM module tree built in the same process shares its tensors (LoRA adapters
are per tree). A process without the LLM (a client) loads the LLM on the CPU, prunes it, and moves
only the kept layers to the device.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import random
from dataclasses import dataclass

import torch

from fedcollm.config import Config
from fedcollm.data import chat
from fedcollm.data.encode import Encoded, as_encoded, encode_for_training, encode_pairs, pad_id_of
from fedcollm.data.loaders import load_eval, load_train, read_records, style_of
from fedcollm.data.partition import Split, split_indices
from fedcollm.data.records import (Record, all_pairs, check_held_out, context, continuations, only_multiple_choice,
                                   training_pairs)
from fedcollm.errors import FedCoLLMError
from fedcollm.eval import scoring
from fedcollm.eval.mcq import Request
from fedcollm.models.compat import checkpoint_activations
from fedcollm.models.loading import (
    cache_root, load_base_model, load_tokenizer, prune_layers, resolve_device, resolve_dtype)
from fedcollm.models.lora import attach_lora
from fedcollm.train.align import VocabMap, within_shared_text
from fedcollm.train.distill import AuxSet

EVAL_SUBSET_SEED = 1234  # the same evaluation items for every run seed, so seeds are comparable


@dataclass(frozen=True)
class ServerData:
    aux: AuxSet  # as each model tokenizes it
    # multiple choice, or prompt-completion (eval/scoring.py: `eval_kind`), conversations as the
    # SLM's template renders them (the LLM's requests are its own rendering of the same items)
    evals: list[Record]
    eval_kind: str
    # "llm" / "slm": each model's own tokenization (scoring.prepare: each question's choices, or
    # each prompt-completion pair)
    eval_requests: dict[str, list[Request] | list[Encoded]]
    # Example count of each client part (records.training_pairs: a conversation counts its learnt
    # turns) where the server can compute the split; None when it has only data.aux_file (then
    # federation.max_client_examples bounds the weights).
    client_sizes: tuple[int, ...] | None


def device_of(cfg: Config) -> torch.device:
    return resolve_device(cfg.model.device)


def release_cached_memory() -> None:
    """Hand the GPU memory that torch's caching allocator holds but no tensor uses back to the
    driver. A process that then waits (a client between its rounds, the server while the clients
    train) holds only its models, and the memory serves the other processes on the GPU: the
    clients, or the other jobs of `fedcollm experiment --jobs N`. A no-op without CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def dtype_of(cfg: Config) -> torch.dtype:
    return resolve_dtype(cfg.model.dtype, device_of(cfg))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(source: str, cache_dir: str):
    return load_tokenizer(source, cache_dir)


@functools.lru_cache(maxsize=8)
def _own_slm_tokenizer(slm: str, llm: str, cache_dir: str):
    """The SLM source's tokenizer if its vocabulary differs from the LLM's, else None."""
    own = _load_tokenizer(slm, cache_dir)
    return None if own.get_vocab() == _load_tokenizer(llm, cache_dir).get_vocab() else own


def tokenizer(cfg: Config, model: str = "llm"):
    """The LLM's tokenizer, or (model="slm") the SLM's: the very same object unless the SLM has
    its own source with another vocabulary."""
    m = cfg.model
    llm = _load_tokenizer(m.llm, m.cache_dir)
    if model == "llm" or not m.slm or m.slm == m.llm:
        return llm
    return _own_slm_tokenizer(m.slm, m.llm, m.cache_dir) or llm


def shares_tokenizer(cfg: Config) -> bool:
    return tokenizer(cfg, "slm") is tokenizer(cfg)


def pad_id(cfg: Config, model: str = "slm") -> int:
    return pad_id_of(tokenizer(cfg, model))


def _held_out(records: list[Record], n: int) -> tuple[list[Record], list[Record]]:
    """(the rest, n records held out): the same n for every run seed."""
    if n >= len(records):
        raise FedCoLLMError(f"config: data.holdout_examples = {n} leaves no training data ({len(records)} records)")
    held = set(random.Random(EVAL_SUBSET_SEED).sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


@functools.cache
def _say_borrowed_template(model: str, other: str) -> None:
    """Once a process (the training, auxiliary and evaluation records are rendered apart)."""
    print(f"[fedcollm] data: the tokenizer of {model} has no chat template: its conversations are rendered by "
          f"{other}'s", flush=True)


def _rendered(cfg: Config, records: list, model: str = "slm") -> list[Record]:
    """The records as read, conversations rendered (data/chat.py) by the chat template of `model`'s
    tokenizer: each model learns and is scored on the text it reads when it chats. A model whose
    tokenizer has no template (a base LLM beside a chat SLM) reads the other's, as the log says."""
    if shares_tokenizer(cfg):
        model = "slm"  # one tokenizer, one rendering
    other = "llm" if model == "slm" else "slm"
    names = {"llm": cfg.model.llm, "slm": cfg.model.slm or cfg.model.llm}

    def template_tokenizer():  # asked for only where there are conversations
        own = tokenizer(cfg, model)
        if getattr(own, "chat_template", None) or not getattr(tokenizer(cfg, other), "chat_template", None):
            return own
        _say_borrowed_template(names[model], names[other])
        return tokenizer(cfg, other)

    return chat.render(records, template_tokenizer, names[model])


@functools.lru_cache(maxsize=4)
def _read_training(cfg: Config) -> list:
    return load_train(cfg.data)


@functools.lru_cache(maxsize=4)
def _training_records(cfg: Config, model: str = "slm") -> list[Record]:
    return _rendered(cfg, _read_training(cfg), model)


@functools.lru_cache(maxsize=4)
def train_split(cfg: Config, model: str = "slm") -> tuple[list[Record], Split]:
    """The training records (less any held-out evaluation items) as `model` reads them, and their
    split into auxiliary and client parts: one split for both models, made on the SLM's records."""
    d = cfg.data
    if model != "slm" and shares_tokenizer(cfg):
        return train_split(cfg)  # one tokenizer: the same records
    train = _training_records(cfg, model)
    if d.eval_split == "train_holdout":
        train, _ = _held_out(train, d.holdout_examples)
    if model != "slm":
        return train, train_split(cfg)[1]
    split = split_indices(train, d.num_clients, d.partition, d.dirichlet_alpha, cfg.run.seed,
                          d.max_train_examples, d.aux_fraction, with_aux=not d.aux_file, topics=d.topics)
    return train, split


def _encode(cfg: Config, records: list[Record], model: str = "slm") -> list[Encoded]:
    return encode_for_training(tokenizer(cfg, model), records, cfg.data.max_length)


def _aux_set(cfg: Config, records: list[Record], llm_records: list[Record] | None = None) -> AuxSet:
    """The auxiliary records as the KD needs them: each model's tokenization of the correct
    answers or completions (the LLM's of `llm_records`, the same records as its template renders
    them, where given), with character spans when the tokenizers differ, and of every choice for
    distill.level = choice."""
    shared, n = shares_tokenizer(cfg), cfg.data.max_length
    pairs = all_pairs(records)
    llm_pairs = pairs if llm_records is None else all_pairs(llm_records)
    llm = encode_pairs(tokenizer(cfg), llm_pairs, n, with_spans=not shared)
    slm = llm if shared else encode_pairs(tokenizer(cfg, "slm"), pairs, n, with_spans=True)
    if not shared:
        llm, slm = _spans_within_shared_text(llm, slm, llm_pairs, pairs)
    choices = {}
    if cfg.distill.level == "choice":
        only_multiple_choice(records, "the server's auxiliary data", "distill.level = 'choice'", "use 'token'")
        for model in ("llm", "slm"):
            flat = iter(encode_pairs(tokenizer(cfg, model), [(context(r), c) for r in records
                                                             for c in continuations(r)], n))
            choices[model] = [[next(flat) for _ in r.choices] for r in records]
    return AuxSet(llm, slm, pad_id(cfg, "llm"), pad_id(cfg, "slm"), choices.get("llm"), choices.get("slm"),
                  tuple(r.answer for r in records) if choices else None)


def _spans_within_shared_text(llm: list[Encoded], slm: list[Encoded], llm_pairs: list, slm_pairs: list):
    """Where the two models' answer texts differ (a conversation, each model's template's end-of-turn
    marks after the same answer), each side's spans cut to the text they share (train/align.py):
    KD pairs tokens by characters there only."""
    out_f, out_g = [], []
    for f, g, fp, gp in zip(llm, slm, llm_pairs, slm_pairs):
        f_text, g_text = as_encoded(*fp)[1], as_encoded(*gp)[1]
        if f_text != g_text:
            f_spans, g_spans = within_shared_text(list(f.spans), f_text, list(g.spans), g_text)
            f, g = dataclasses.replace(f, spans=tuple(f_spans)), dataclasses.replace(g, spans=tuple(g_spans))
        out_f.append(f)
        out_g.append(g)
    return out_f, out_g


def eval_records(cfg: Config, model: str = "slm") -> tuple[list[Record], str]:
    """The whole evaluation set as `model` reads it (before data.eval_examples picks from it) and
    where it is from."""
    if cfg.data.eval_split == "train_holdout":  # the server scores items held out of the training split
        return _held_out(_training_records(cfg, model), cfg.data.holdout_examples)[1], \
            f"{cfg.data.train_file or cfg.data.dataset} train_holdout"
    return _rendered(cfg, _read_eval(cfg), model), cfg.data.eval_file or f"{cfg.data.dataset} {cfg.data.eval_split}"


@functools.lru_cache(maxsize=4)
def _read_eval(cfg: Config) -> list:
    """The evaluation file as read, once for both models' renderings."""
    return load_eval(cfg.data)


@functools.lru_cache(maxsize=4)
def server_data(cfg: Config) -> ServerData:
    evals, where = eval_records(cfg)
    kind = scoring.kind_of(evals, where)
    shared = shares_tokenizer(cfg)
    llm_evals = evals if shared else eval_records(cfg, "llm")[0]
    if cfg.data.eval_examples and cfg.data.eval_examples < len(evals):
        picked = random.Random(EVAL_SUBSET_SEED).sample(range(len(evals)), cfg.data.eval_examples)
        evals, llm_evals = [evals[i] for i in picked], [llm_evals[i] for i in picked]
    requests = {"llm": scoring.prepare(tokenizer(cfg), llm_evals, kind, cfg.data.max_length)}
    requests["slm"] = requests["llm"] if shared else \
        scoring.prepare(tokenizer(cfg, "slm"), evals, kind, cfg.data.max_length)
    if cfg.data.aux_file:
        read = read_records(cfg.data.aux_file, style_of(cfg.data))
        aux = _rendered(cfg, read)
        check_held_out(evals, aux, where)  # the only training data this server has
        return ServerData(_aux_set(cfg, aux, None if shared else _rendered(cfg, read, "llm")), evals, kind,
                          requests, None)
    train, split = train_split(cfg)
    llm_train = train_split(cfg, "llm")[0]
    check_held_out(evals, [train[i] for i in itertools.chain(split.aux, *split.clients)], where)
    return ServerData(_aux_set(cfg, [train[i] for i in split.aux], [llm_train[i] for i in split.aux]), evals, kind,
                      requests, tuple(sum(len(training_pairs(train[i])) for i in part) for part in split.clients))


@functools.lru_cache(maxsize=8)
def client_examples(cfg: Config, partition_id: int, model: str = "slm") -> list[Encoded]:
    """One client's part of the split, tokenized (only that part) for the SLM (or the LLM:
    the centralized baseline)."""
    train, split = train_split(cfg, model)
    return _encode(cfg, [train[i] for i in split.clients[partition_id]], model)


@functools.lru_cache(maxsize=2)
def own_examples(cfg: Config, path: str) -> list[Encoded]:
    """All of a SuperNode's own data file, for a client that holds its data itself."""
    return _encode(cfg, _rendered(cfg, read_records(path, style_of(cfg.data))))


@functools.lru_cache(maxsize=2)
def vocab_maps(cfg: Config) -> tuple[VocabMap, VocabMap] | None:
    """(LLM → SLM, SLM → LLM) token maps for token-level KD across tokenizers; None with one."""
    if shares_tokenizer(cfg) or cfg.distill.level != "token":
        return None
    folder = cache_root(cfg.model.cache_dir) / "vocab-maps"
    return (VocabMap(tokenizer(cfg), tokenizer(cfg, "slm"), folder),
            VocabMap(tokenizer(cfg, "slm"), tokenizer(cfg), folder))


# --- models -------------------------------------------------------------------------------------

_LLM_WEIGHTS: dict[tuple, torch.nn.Module] = {}  # this process's LLM base, never wrapped itself


def _llm_key(cfg: Config) -> tuple:
    return (cfg.model.llm, str(dtype_of(cfg)), str(device_of(cfg)), cfg.model.cache_dir)


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree whose parameters and buffers are `model`'s own tensors (no copy)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def llm_base(cfg: Config) -> torch.nn.Module:
    """The LLM without adapter: a fresh module tree over the process's one copy of its weights."""
    key = _llm_key(cfg)
    if key not in _LLM_WEIGHTS:
        _LLM_WEIGHTS[key] = load_base_model(cfg.model.llm, dtype_of(cfg), cfg.model.cache_dir).to(device_of(cfg))
    return shared_copy(_LLM_WEIGHTS[key])


def slm_base(cfg: Config) -> torch.nn.Module:
    """The SLM without adapter: a depth-pruned copy of the LLM, or its own source."""
    m = cfg.model
    if m.slm:
        return load_base_model(m.slm, dtype_of(cfg), m.cache_dir).to(device_of(cfg))
    held = _LLM_WEIGHTS.get(_llm_key(cfg))
    if held is not None:  # the LLM is here already: the SLM's layers are its layers
        return prune_layers(shared_copy(held), m.slm_keep_first, m.slm_keep_last)
    # Prune on the CPU, then move: the dropped layers never reach the device.
    return prune_layers(load_base_model(m.llm, dtype_of(cfg), m.cache_dir),
                        m.slm_keep_first, m.slm_keep_last).to(device_of(cfg))


def _with_adapter(base, cfg: Config, freeze_a: bool = False):
    torch.manual_seed(cfg.run.seed)  # the same initial adapter in every process
    lo = cfg.lora
    model = attach_lora(base, lo.r, lo.alpha, lo.dropout, lo.target_modules, freeze_a, seed=cfg.run.seed)
    if cfg.model.compile:
        # Each decoder layer, not the whole decoder ("regional compilation", PyTorch's recipe):
        # the layers share one compiled graph, so the compile costs one layer's time, and the
        # LLM and the SLM (same layer class, different depths) share it too. The whole decoder
        # took 246 s for the SLM's first step on 2 CPU cores and was compiled again for the
        # LLM. In place: parameter names, and so the adapter's keys on the wire, stay as they
        # are. dynamic: every batch has its own sequence length.
        for layer in model.get_base_model().get_decoder().layers:
            layer.compile(dynamic=True)
    if cfg.model.activation_checkpointing:
        checkpoint_activations(model)
    return model


def build_slm(cfg: Config):
    return _with_adapter(slm_base(cfg), cfg, freeze_a=cfg.lora.freeze_a)


def build_llm(cfg: Config):
    # The LLM's adapter never travels: a frozen A would only take capacity from it.
    return _with_adapter(llm_base(cfg), cfg)


@functools.lru_cache(maxsize=2)
def cached_client_slm(cfg: Config):
    """One SLM per client process; each fit overwrites its adapter with the global one."""
    return build_slm(cfg)
