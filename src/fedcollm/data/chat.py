"""Conversational instruction data (TRL's conversational forms), rendered with a chat template.

Which assistant messages a model learns follows TRL's SFTTrainer:
- `{"messages": [...]}` (TRL's language-modelling form, with `assistant_only_loss`): every
  assistant message after the first message; the last message must be one.
- `{"prompt": [messages], "completion": [one assistant message]}` (TRL's prompt-completion
  form, with `completion_only_loss`): the completion only; assistant messages in the prompt are
  read, not learnt.

A record is rendered once, right after it is read, into a prompt-completion record with one
pair per learnt message: the prompt is the template's rendering of the messages before it with
the generation prompt, the completion what the rendering up to that message adds to it (the
answer and the template's end-of-turn marks). Each turn is thus learnt after the text the model
reads when it writes that turn, even where a template renders earlier turns differently (some
drop an earlier answer's reasoning); the price is a pass over the conversation's prefix per
learnt turn. Each model's tokenizer's template renders the records that model reads
(components.py), so each learns the chat format it is used with; across two tokenizers,
token-level KD aligns the characters both renderings of an answer share (train/align.py).
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
    learnt: tuple[int, ...]  # the indices of the assistant messages learnt, the last message's last


def conversation(id: str, messages, where: str, completion=None) -> Conversation:
    """{"messages": [...]} (every assistant message after the first message learnt), or TRL's
    {"prompt": [...], "completion": [one assistant message]} (the completion learnt)."""
    if completion is not None and (not isinstance(completion, list) or len(completion) != 1):
        raise FedCoLLMError(f"{where}: a conversational 'completion' must be a list of one assistant message")
    every = [*messages, *(completion or [])] if isinstance(messages, list) else None
    if not every or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in every):
        raise FedCoLLMError(f"{where}: messages must be a non-empty list of {{'role': str, 'content': str}} objects")
    if len(every) < 2 or every[-1]["role"] != "assistant" or not every[-1]["content"].strip():
        raise FedCoLLMError(f"{where}: a conversation needs at least one message before the last, and the last must "
                            "be a non-empty 'assistant' message (the answer learnt)")
    last = len(every) - 1
    learnt = (last,) if completion is not None else tuple(
        i for i, m in enumerate(every) if i > 0 and m["role"] == "assistant" and m["content"].strip())
    return Conversation(id, tuple((m["role"], m["content"]) for m in every), learnt)


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
        turns = [_turn(tokenizer, r, i, whose, bos) for i in r.learnt]
        out.append(Completion(r.id, *turns[-1], earlier=tuple(turns[:-1])))
    return out


def _turn(tokenizer, r: Conversation, i: int, whose: str, bos: str | None) -> tuple[str, str]:
    """(the template's rendering of the messages before message i, with the generation prompt;
    what rendering message i too adds to it)."""
    messages = [{"role": role, "content": content} for role, content in r.messages[:i + 1]]
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template raises what it likes (jinja's raise_exception)
        raise FedCoLLMError(f"{r.id}: {whose}'s chat template refused the conversation up to message {i}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not whole.startswith(prompt):
        raise FedCoLLMError(f"{r.id}: {whose}'s chat template does not render the conversation up to message {i} "
                            "as its prompt followed by the answer; give 'prompt' and 'completion' strings instead")
    if bos and prompt.startswith(bos):  # encoding puts the BOS in front itself (data/encode.py)
        prompt, whole = prompt[len(bos):], whole[len(bos):]
    return prompt, whole[len(prompt):]
