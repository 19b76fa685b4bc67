"""What a run is made of, built once per process and cached: data, split, tokenizer, models.

The federated apps, the baselines and the tests all build their pieces here, so the same config
gives the same split, the same token ids and the same initial adapters everywhere. Ray actors and
the server keep these between rounds (no reload, no re-tokenization per round).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from fedcollm.config import Config
from fedcollm.data.encode import Encoded, encode_for_training
from fedcollm.data.loaders import load_train_and_eval
from fedcollm.data.partition import Split, split_indices
from fedcollm.data.records import MCQRecord
from fedcollm.errors import FedCoLLMError
from fedcollm.models.loading import (
    load_base_model, load_tokenizer, prune_layers, resolve_device, resolve_dtype)
from fedcollm.models.lora import attach_lora

EVAL_SUBSET_SEED = 1234  # the same evaluation items for every run seed, so seeds are comparable


@dataclass(frozen=True)
class RunData:
    train: list[MCQRecord]
    evals: list[MCQRecord]
    split: Split
    aux: list[Encoded]
    clients: list[list[Encoded]]


def device_of(cfg: Config) -> torch.device:
    return resolve_device(cfg.model.device)


def dtype_of(cfg: Config) -> torch.dtype:
    return resolve_dtype(cfg.model.dtype, device_of(cfg))


@functools.lru_cache(maxsize=4)
def tokenizer(cfg: Config):
    return load_tokenizer(cfg.model.llm, cfg.model.cache_dir)


@functools.lru_cache(maxsize=4)
def run_data(cfg: Config) -> RunData:
    train, evals = load_train_and_eval(cfg.data)
    if cfg.data.eval_examples and cfg.data.eval_examples < len(evals):
        evals = random.Random(EVAL_SUBSET_SEED).sample(evals, cfg.data.eval_examples)
    split = split_indices(train, cfg.data.num_clients, cfg.data.partition, cfg.data.dirichlet_alpha,
                          cfg.run.seed, cfg.data.max_train_examples)
    tok = tokenizer(cfg)

    def enc(idx):
        return encode_for_training(tok, [train[i] for i in idx], cfg.data.max_length)

    return RunData(train, evals, split, enc(split.aux), [enc(part) for part in split.clients])


def _check_same_tokenizer(cfg: Config) -> None:
    if not cfg.model.slm or cfg.model.slm == cfg.model.llm:
        return
    a, b = tokenizer(cfg), load_tokenizer(cfg.model.slm, cfg.model.cache_dir)
    if a.get_vocab() != b.get_vocab():
        raise FedCoLLMError(
            f"FedCoLLM's KD needs one tokenizer: the LLM {cfg.model.llm!r} ({len(a)} tokens) and the "
            f"SLM {cfg.model.slm!r} ({len(b)} tokens) differ; token alignment is not supported yet")


def _with_adapter(base, cfg: Config):
    torch.manual_seed(cfg.run.seed)  # the same initial adapter in every process
    lo = cfg.lora
    return attach_lora(base, lo.r, lo.alpha, lo.dropout, lo.target_modules)


def slm_base(cfg: Config):
    """The SLM without adapter: a depth-pruned copy of the LLM, or its own source."""
    _check_same_tokenizer(cfg)
    if cfg.model.slm:
        return load_base_model(cfg.model.slm, dtype_of(cfg), device_of(cfg), cfg.model.cache_dir)
    return prune_layers(llm_base(cfg), cfg.model.slm_keep_first, cfg.model.slm_keep_last)


def build_slm(cfg: Config):
    return _with_adapter(slm_base(cfg), cfg)


def llm_base(cfg: Config):
    return load_base_model(cfg.model.llm, dtype_of(cfg), device_of(cfg), cfg.model.cache_dir)


def build_llm(cfg: Config):
    return _with_adapter(llm_base(cfg), cfg)


@functools.lru_cache(maxsize=2)
def cached_client_slm(cfg: Config):
    """One SLM per client process; each fit overwrites its adapter with the global one."""
    return build_slm(cfg)
