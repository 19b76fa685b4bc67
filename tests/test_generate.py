"""`fedcollm generate`: greedy text, the same in a batch of prompts of many lengths (left padding)
as one prompt at a time by hand, through a LoRA adapter; and its prompts from a records file."""

from __future__ import annotations

import json

import torch

from fedcollm.data.encode import bos_prefix
from fedcollm.models.generate import generate, stop_ids


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
