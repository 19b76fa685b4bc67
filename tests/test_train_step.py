"""One training step, held to transformers' own causal-LM loss on whatever version is installed
(CI also runs this file on the lowest transformers and peft that pyproject.toml allows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedcollm.data.encode import collate, encode_pairs
from fedcollm.models.loading import tiny_model, tiny_tokenizer
from fedcollm.models.lora import adapter_state, attach_lora
from fedcollm.models.logits import answer_logits
from fedcollm.train.sft import sft

PAIRS = [("Question: What color is the sky?\nAnswer:", " blue"),
         ("Question: Which is hot?\nAnswer:", " the sun"),
         ("The sun is responsible for plants sprouting,", " blooming and wilting.")]


def _lora(dropout: float = 0.0):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = attach_lora(tiny_model(len(tok)), 4, 8, dropout, ("q_proj", "v_proj"))
    for n, p in model.named_parameters():  # B = 0 at init: make the adapter matter for the check
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model, tok


@pytest.fixture
def lora_model():
    return _lora()


def test_answer_only_loss_equals_transformers_own_loss(lora_model):
    model, tok = lora_model
    batch = collate(encode_pairs(tok, PAIRS, 64), tok.pad_token_id)
    pred, target = answer_logits(model, batch)
    ours = F.cross_entropy(pred.float(), target)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert target.numel() == sum(1 for row in batch["labels"][:, 1:] for v in row if v != -100)


def test_one_sft_step_moves_only_the_adapter(lora_model):
    model, tok = lora_model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = sft(model, encode_pairs(tok, PAIRS, 64), epochs=1, lr=1e-2, batch_size=8, pad_id=tok.pad_token_id,
                seed=0, device=torch.device("cpu"))
    assert stats["steps"] == 1 and stats["loss"] > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(adapter_state(model)) | {k for k in before if "lora_" in k}
    assert all("lora_" in k for k in changed)


def test_a_pass_without_a_terminal_shows_its_progress_as_lines(lora_model, capsys, monkeypatch):
    """A simulated client's output reaches the driver through Ray line by line, a job's through its
    log: a tqdm bar there (one line redrawn by carriage returns) shows nothing until it ends."""
    monkeypatch.setattr("fedcollm.progress.PROGRESS_SECONDS", 0.0)  # a line at every step
    model, tok = lora_model
    sft(model, encode_pairs(tok, PAIRS, 64), epochs=4, lr=1e-2, batch_size=1, pad_id=tok.pad_token_id,
        seed=0, device=torch.device("cpu"), progress=True, desc="client 2 round 1")
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert "\r" not in out.out + out.err
    assert lines[0].startswith("[fedcollm] client 2 round 1: step 1 of 12 (8%), ")
    assert lines[-1].startswith("[fedcollm] client 2 round 1: step 12 of 12 (100%), ")
    assert "loss=" in lines[10] and "loss=" not in lines[9]  # read every PROGRESS_EVERY steps, shown next line
    sft(model, encode_pairs(tok, PAIRS, 64), epochs=1, lr=1e-2, batch_size=1, pad_id=tok.pad_token_id,
        seed=0, device=torch.device("cpu"), progress=False)
    assert capsys.readouterr().out == ""


def test_activation_checkpointing_recomputes_each_layer_and_trains_to_the_same_adapter():
    """The memory knob changes how the backward gets its activations, not what it computes: the
    same adapter to the bit after SFT steps with LoRA dropout (whose masks the recompute must draw
    again), and each decoder layer's modules run twice per training step (forward, then again in
    the backward) but once when scoring. (Its attention's calls are counted, as they start: the
    layer's own hooks sit outside the checkpoint in transformers 5, and torch stops a recompute
    as soon as it has the last activation it needs, before any forward hook would run.)"""
    from fedcollm.models.compat import checkpoint_activations

    runs = []
    for checkpointed in (False, True):
        model, tok = _lora(dropout=0.2)  # dropout: the recompute must draw the same masks
        if checkpointed:
            checkpoint_activations(model)
        calls = []
        model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(7)
        stats = sft(model, encode_pairs(tok, PAIRS, 64), epochs=2, lr=1e-2, batch_size=2,
                    pad_id=tok.pad_token_id, seed=0, device=torch.device("cpu"))
        trained_calls = len(calls)
        with torch.no_grad():
            model(**{k: v for k, v in collate(encode_pairs(tok, PAIRS, 64), tok.pad_token_id).items()
                     if k in ("input_ids", "attention_mask")})
        runs.append((stats, adapter_state(model), trained_calls, len(calls) - trained_calls))
    (plain, plain_state, plain_calls, plain_eval), (ckpt, ckpt_state, ckpt_calls, ckpt_eval) = runs
    assert plain["steps"] == ckpt["steps"] == 4
    assert plain_calls == 4 and ckpt_calls == 8  # the recompute: a second call per step
    assert plain_eval == ckpt_eval == 1
    assert ckpt["loss"] == plain["loss"]
    assert list(ckpt_state) == list(plain_state)
    for key in plain_state:
        assert torch.equal(ckpt_state[key], plain_state[key]), key
    assert any("lora_A" in key and not torch.equal(plain_state[key], _lora(dropout=0.2)[0].state_dict()[
        key.replace(".weight", ".default.weight")]) for key in plain_state)  # the adapter did train


def test_micro_batches_take_the_same_step_as_the_whole_batch():
    """client.micro_batch_size: a batch of 3 cut into passes of 2 + 1 or 1 + 1 + 1 (answers of
    1 to 5 tokens) gives the whole batch's token-mean loss and the same adapter, up to float
    rounding; weighting the passes by examples (the mean of their means) would not."""
    tok = tiny_tokenizer()
    examples = encode_pairs(tok, PAIRS, 64)
    assert len({e.n_target for e in examples}) == 3
    got = {}
    for micro in (0, 2, 1):
        model, _ = _lora()
        stats = sft(model, examples, epochs=1, lr=1e-2, batch_size=3, pad_id=tok.pad_token_id, seed=0,
                    device=torch.device("cpu"), micro_batch_size=micro)
        got[micro] = (stats, adapter_state(model))
    whole, whole_state = got[0]
    assert whole["steps"] == 1
    for micro in (2, 1):
        stats, state = got[micro]
        assert stats["steps"] == 1 and stats["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        for key in whole_state:
            torch.testing.assert_close(state[key], whole_state[key], rtol=1e-4, atol=1e-6)
    fresh, _ = _lora()
    with torch.no_grad():
        per_example = [F.cross_entropy(*(t.float() if t.is_floating_point() else t for t in
                                         answer_logits(fresh, collate([e], tok.pad_token_id)))).item()
                       for e in examples]
    assert sum(per_example) / 3 != pytest.approx(whole["loss"], rel=1e-3)
