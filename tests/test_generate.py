"""`fedcollm generate`: greedy text, the same in a batch of prompts of many lengths (left padding)
as one prompt at a time by hand, through a LoRA adapter; sampled text, drawn from the softmax at
the temperature over the top-k tokens, the same for the same seed; and its prompts from a
records file."""

from __future__ import annotations

import json

import torch

from fedcollm.data.encode import bos_prefix
import pytest

from fedcollm.errors import FedCoLLMError
from fedcollm.models.generate import Decoding, generate, stop_ids


def _greedy_by_hand(model, tok, prompt: str, n: int) -> str:
    """The argmax token, n times, from the whole sequence's logits (no cache, no padding)."""
    ids, stops, new = bos_prefix(tok) + tok(prompt, add_special_tokens=False)["input_ids"], stop_ids(model, tok), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in stops:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_batched_greedy_text_is_each_prompts_own(adapted_slm):
    model, tok = adapted_slm
    prompts = ["What colour is the sky?", "Hi", "Question: Which of these is a mammal?\nAnswer:", "The apple is",
               "a"]
    got = generate(model, tok, prompts, max_new_tokens=12, batch_size=3, device=torch.device("cpu"))
    assert got == [_greedy_by_hand(model, tok, p, 12) for p in prompts]
    with model.disable_adapter():  # the adapter is in the text: without it, other text
        assert generate(model, tok, prompts, max_new_tokens=12, batch_size=3, device=torch.device("cpu")) != got


def test_generate_command_writes_a_line_per_record_with_its_reference(tmp_path, capsys):
    from fedcollm.cli import main  # noqa: PLC0415

    f = tmp_path / "records.jsonl"
    f.write_text(json.dumps({"id": "m", "question": "Which is red?", "choices": ["sky", "apple"], "answer": 1}) + "\n"
                 + json.dumps({"id": "c", "prompt": "Say hi.\n", "completion": "Hi!"}) + "\n")
    assert main(["generate", "--model", "tiny-random", "--file", str(f), "--max-new-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["id"], x["prompt"], x["reference"]) for x in lines] == [
        ("m", "Question: Which is red?\nAnswer:", " apple"), ("c", "Say hi.\n", "Hi!")]
    assert all(isinstance(x["generation"], str) for x in lines)


def test_generate_command_refuses_both_or_neither_source(tmp_path, capsys):
    from fedcollm.cli import main  # noqa: PLC0415

    assert main(["generate", "--model", "tiny-random"]) == 2
    assert capsys.readouterr().err.strip() == ("fedcollm: error: fedcollm generate: give --prompt (once or more) or "
                                               "--file, not both")
    assert main(["generate", "--model", "tiny-random", "--chat", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == ("fedcollm: error: fedcollm generate --chat: the tokenizer of "
                                               "tiny-random has no chat template")
    assert main(["generate", "--model", "tiny-random", "--prompt", "hi", "--top-p", "0.9"]) == 2
    assert capsys.readouterr().err.strip() == ("fedcollm: error: --top-k and --top-p choose among sampled tokens: "
                                               "give a --temperature > 0 with them (0 is greedy)")


def test_generate_command_samples_the_same_text_with_the_same_seed(capsys):
    from fedcollm.cli import main  # noqa: PLC0415

    def lines(seed: str) -> list[str]:
        assert main(["generate", "--model", "tiny-random", "--prompt", "The sky", "--prompt", "Hi",
                     "--max-new-tokens", "6", "--temperature", "1.0", "--seed", seed]) == 0
        return capsys.readouterr().out.splitlines()

    assert lines("5") == lines("5") != lines("6")


def test_sampled_first_tokens_follow_the_softmax_at_the_temperature_over_the_top_k_and_p(adapted_slm, monkeypatch):
    model, tok = adapted_slm
    monkeypatch.setattr(model.generation_config, "top_k", 1)  # a model's own setting must not override the options
    prompt, n, t, k = "The apple is", 600, 0.1, 3
    ids = bos_prefix(tok) + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    top = logits.topk(k)
    probs = torch.softmax(top.values / t, -1)  # at t = 1 these three would be about equal
    assert 0.2 < probs.max() - probs.min() and probs.max() < 0.9
    stops = stop_ids(model, tok)
    want: dict[str, float] = {}
    for i, p in zip(top.indices.tolist(), probs.tolist()):
        text = "" if i in stops else tok.decode([i], skip_special_tokens=True)
        want[text] = want.get(text, 0.0) + p
    got = generate(model, tok, [prompt] * n, max_new_tokens=1, batch_size=n, device=torch.device("cpu"),
                   decoding=Decoding(temperature=t, top_k=k, seed=1))
    assert set(got) <= set(want)  # nothing outside the top k
    for text, p in want.items():  # each within 4 standard errors of its probability
        assert abs(got.count(text) / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (text, got.count(text), p)
    first = max(want, key=want.get)  # its probability alone reaches top_p = 0.5: the others are cut
    assert generate(model, tok, [prompt] * 50, max_new_tokens=1, batch_size=50, device=torch.device("cpu"),
                    decoding=Decoding(temperature=t, top_k=k, top_p=0.5, seed=1)) == [first] * 50


def test_samples_repeat_with_their_seed_and_top_k_1_is_greedy(adapted_slm):
    model, tok = adapted_slm
    prompts, cpu = ["What colour is the sky?", "Hi", "The apple is"], torch.device("cpu")

    def sample(**kw):
        return generate(model, tok, prompts, max_new_tokens=8, batch_size=2, device=cpu, decoding=Decoding(**kw))

    first = sample(temperature=1.0, seed=3)
    assert sample(temperature=1.0, seed=3) == first
    assert sample(temperature=1.0, seed=4) != first
    greedy = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, device=cpu)
    assert first != greedy
    assert sample(temperature=1.0, top_k=1, seed=3) == greedy


@pytest.mark.parametrize("kw, said", [
    ({"temperature": -1.0}, "--temperature -1.0: must be >= 0 (0: greedy)"),
    ({"temperature": 1.0, "top_k": -2}, "--top-k -2: must be >= 0 (0: no top-k cut)"),
    ({"temperature": 1.0, "top_p": 0.0}, "--top-p 0.0: must be in (0, 1] (1: no nucleus cut)"),
    ({"top_p": 0.9}, "--top-k and --top-p choose among sampled tokens: give a --temperature > 0 with them (0 is greedy)"),
])
def test_decoding_refuses_values_that_choose_nothing(kw, said):
    with pytest.raises(FedCoLLMError) as e:
        Decoding(**kw)
    assert str(e.value) == said
