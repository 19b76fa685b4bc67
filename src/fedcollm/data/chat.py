"""Conversational instruction data (TRL's conversational forms), rendered with a chat template.

A record is a list of messages whose last one, the assistant's answer, is what the model learns
(earlier turns, assistant turns too, are prompt). It is rendered once, right after it is read,
into a prompt-completion record: the prompt is the template's rendering of the earlier messages
with the generation prompt, the completion what the whole conversation's rendering adds to it
(the answer and the template's end-of-turn marks). The SLM's tokenizer's template renders every
record for both models: the LLM and the SLM then read the same text, which token-level KD across
two tokenizers needs (it aligns the characters of the same answer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedcollm.data.encode import bos_prefix
from fedcollm.data.records import Completion
from fedcollm.errors import FedCoLLMError


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content), the last the assistant's


def parse_messages(messages, where: str, completion=None) -> tuple[tuple[str, str], ...]:
    """{"messages": [...]} or TRL's {"prompt": [...], "completion": [one assistant message]}."""
    if completion is not None and (not isinstance(completion, list) or len(completion) != 1):
        raise FedCoLLMError(f"{where}: a conversational 'completion' must be a list of one assistant message")
    every = [*messages, *(completion or [])] if isinstance(messages, list) else None
    if not every or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in every):
        raise FedCoLLMError(f"{where}: messages must be a non-empty list of {{'role': str, 'content': str}} objects")
    if len(every) < 2 or every[-1]["role"] != "assistant" or not every[-1]["content"].strip():
        raise FedCoLLMError(f"{where}: a conversation needs at least one message before the last, and the last must "
                            "be a non-empty 'assistant' message (the answer learnt)")
    return tuple((m["role"], m["content"]) for m in every)


def render(records: list, tokenizer_of: Callable[[], object], whose: str) -> list:
    """The records with each Conversation rendered into a Completion by the chat template of the
    tokenizer `tokenizer_of()` gives (asked for only if there is a conversation; `whose`: its
    model, for errors); other records as they are."""
    if not any(isinstance(r, Conversation) for r in records):
        return records
    tokenizer = tokenizer_of()
    if not getattr(tokenizer, "chat_template", None):
        first = next(r for r in records if isinstance(r, Conversation))
        raise FedCoLLMError(f"{first.id}: a conversational record needs a chat template, and the tokenizer of "
                            f"{whose} has none; give 'prompt' and 'completion' strings instead")
    bos = tokenizer.bos_token if bos_prefix(tokenizer) else None
    out = []
    for r in records:
        if not isinstance(r, Conversation):
            out.append(r)
            continue
        messages = [{"role": role, "content": content} for role, content in r.messages]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(prompt):
            raise FedCoLLMError(f"{r.id}: {whose}'s chat template does not render the conversation as its prompt "
                                "followed by the answer; give 'prompt' and 'completion' strings instead")
        if bos and prompt.startswith(bos):  # encoding puts the BOS in front itself (data/encode.py)
            prompt, whole = prompt[len(bos):], whole[len(bos):]
        out.append(Completion(r.id, prompt, whole[len(prompt):]))
    return out
