"""model.compile = true (torch.compile of each decoder layer) trains and scores as the eager model does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedcollm import components
from fedcollm.config import Config
from fedcollm.eval.mcq import choice_logliks
from fedcollm.models.lora import adapter_state
from fedcollm.train.sft import sft


def _train_and_score(cfg):
    model = components.build_slm(cfg)
    stats = sft(model, components.client_examples(cfg, 0), epochs=1, lr=1e-3, batch_size=4,
                pad_id=components.pad_id(cfg), seed=0, device=torch.device("cpu"))
    requests = components.server_data(cfg).eval_requests["slm"]
    scores = choice_logliks(model, requests, batch_size=8, device=torch.device("cpu"), pad_id=components.pad_id(cfg))
    return model, stats, scores


def test_compiled_decoder_trains_and_scores_like_the_eager_one(smoke_cfg):
    # No LoRA dropout: compiled code draws its random masks from another generator.
    base = dataclasses.replace(smoke_cfg, lora=dataclasses.replace(smoke_cfg.lora, dropout=0.0))
    eager, eager_stats, eager_scores = _train_and_score(base)
    compiled, stats, scores = _train_and_score(dataclasses.replace(base, model=dataclasses.replace(base.model, compile=True)))
    assert all(layer._compiled_call_impl is not None for layer in compiled.get_base_model().get_decoder().layers)
    assert all(layer._compiled_call_impl is None for layer in eager.get_base_model().get_decoder().layers)
    assert stats["steps"] == eager_stats["steps"] > 1
    assert stats["loss"] == pytest.approx(eager_stats["loss"], rel=1e-3)
    ours, theirs = adapter_state(compiled), adapter_state(eager)
    assert list(ours) == list(theirs)  # the same keys: what crosses the network is unchanged
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(eager_scores), rtol=1e-3, atol=1e-3)


def test_compile_leaves_the_config_digest_of_earlier_results_alone():
    # 39a9f8f0a27181e1: the default config's digest before model.compile existed (commit
    # f9536ee; transport was fp32 then, "auto" since), under which cached results were filed.
    # A new field must keep it (add the field to config.DIGEST_NEW_FIELDS) or every cache in
    # results/ is lost.
    earlier = Config(federation=dataclasses.replace(Config().federation, transport="fp32"))
    assert earlier.digest() == "39a9f8f0a27181e1"
    on = dataclasses.replace(earlier, model=dataclasses.replace(earlier.model, compile=True))
    assert on.digest() != earlier.digest()
