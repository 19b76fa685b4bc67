"""Read QA splits from local files (or the Hugging Face hub, if reachable).

A file is JSON lines, or Parquet (a `.parquet` file, one record a row, as the Hugging Face hub
stores datasets). These record formats are read, detected per record:
- AI2 / original release format (ARC, OpenBookQA, CommonsenseQA):
  {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}, or the hub's layout of
  them: {"id", "question" | "question_stem": str, "choices": {"text": [...], "label": [...]}, "answerKey"}
- the generic fedcollm MCQ form, for your own data:
  {"id"?: str, "question": str, "choices": [str, ...], "answer": int (0-based) | "B"}
- instruction data in TRL's standard prompt-completion form (records.Completion):
  {"id"?: str, "prompt": str, "completion": str}
- instruction data in TRL's conversational forms (data/chat.py: rendered by a chat template, one
  pair per learnt answer):
  {"id"?: str, "messages": [{"role", "content"}, ...]} or {"prompt": [messages], "completion": [message]}

Where a dataset is looked for, in order: the path the user gives (`data.path`), $FEDCOLLM_DATA,
`../shared/data` beside the checkout (and beside the working directory), then the hub.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fedcollm.data.chat import Conversation, conversation
from fedcollm.data.records import Completion, MCQRecord, Record
from fedcollm.errors import FedCoLLMError


@dataclass(frozen=True)
class DatasetSpec:
    files: dict[str, str]  # split -> path relative to the data root
    hub: tuple[str, str | None]  # (dataset id, config name)
    style: str
    hub_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"), ("test", "test"))
    metric: str = "acc"  # the headline metric (below)


# The metric the claims, the dev search and the traffic rule go by, per dataset (tables show
# both). acc_norm where right answers tend to be the longest choice, so that summed
# log-likelihood (acc) favours short wrong answers. On the validation splits the right answer is
# the longest choice for 42% of OpenBookQA's items (4 choices: 25% by chance) and 29% of
# ARC-Challenge's, against 21% of ARC-Easy's and 22% of CommonsenseQA's (5 choices). With
# SmolLM2-135M-Instruct, never on test: OpenBookQA validation zero-shot acc 17.6, below chance,
# acc_norm 31.4; ARC-Challenge validation, centralized LLM acc 29.8-33.1, acc_norm 38.5-38.8
# (session 6's dev cells). ARC-Easy and CommonsenseQA keep acc, as the earlier results were read.


DATASETS: dict[str, DatasetSpec] = {
    "arc_easy": DatasetSpec(
        {"train": "arc/ARC-Easy-Train.jsonl", "validation": "arc/ARC-Easy-Dev.jsonl",
         "test": "arc/ARC-Easy-Test.jsonl"}, ("allenai/ai2_arc", "ARC-Easy"), "arc"),
    "arc_challenge": DatasetSpec(
        {"train": "arc/ARC-Challenge-Train.jsonl", "validation": "arc/ARC-Challenge-Dev.jsonl",
         "test": "arc/ARC-Challenge-Test.jsonl"}, ("allenai/ai2_arc", "ARC-Challenge"), "arc", metric="acc_norm"),
    "openbookqa": DatasetSpec(
        {"train": "openbookqa/train.jsonl", "validation": "openbookqa/dev.jsonl",
         "test": "openbookqa/test.jsonl"}, ("allenai/openbookqa", "main"), "openbookqa", metric="acc_norm"),
    # Its official test split has no labels: like lm-eval, evaluate on the dev split.
    "commonsense_qa": DatasetSpec(
        {"train": "commonsenseqa/train_rand_split.jsonl",
         "validation": "commonsenseqa/dev_rand_split.jsonl",
         "test": "commonsenseqa/dev_rand_split.jsonl"}, ("tau/commonsense_qa", None),
        "commonsense_qa", (("train", "train"), ("validation", "validation"), ("test", "validation"))),
}


def _parse_completion(obj: dict, where: str) -> Completion | Conversation:
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if isinstance(prompt, list):  # TRL's conversational prompt-completion form
        return conversation(str(obj.get("id", where)), prompt, where, completion)
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
        raise FedCoLLMError(f"{where}: a prompt-completion record needs a 'prompt' string and a non-empty "
                            "'completion' string")
    return Completion(str(obj.get("id", where)), prompt, completion)


def _as_ai2(obj: dict, where: str) -> dict:
    """A row in the Hugging Face hub's layout of these datasets (ai2_arc, commonsense_qa:
    "question"; openbookqa: "question_stem"; "choices": {"text": [...], "label": [...]}) in the AI2
    release form."""
    stem, ch = obj.get("question_stem") or obj.get("question"), obj["choices"]
    texts, labels = ch.get("text"), ch.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise FedCoLLMError(f"{where}: 'choices' must hold 'text' and 'label' lists of one length")
    return {"id": obj.get("id"), "answerKey": obj.get("answerKey"),
            "question": {"stem": stem, "choices": [{"text": t, "label": lab} for t, lab in zip(texts, labels)]}}


def _parse_line(obj: dict, style: str, where: str) -> Record | Conversation:
    if isinstance(obj.get("choices"), dict):
        obj = {k: v for k, v in _as_ai2(obj, where).items() if v is not None}
    if "messages" in obj and "question" not in obj:
        return conversation(str(obj.get("id", where)), obj["messages"], where)
    if "prompt" in obj and "question" not in obj:
        return _parse_completion(obj, where)
    q = obj.get("question")
    if isinstance(q, dict):  # AI2 format
        stem, raw_choices, key = q.get("stem"), q.get("choices"), obj.get("answerKey")
        if not isinstance(stem, str) or not isinstance(raw_choices, list) or not raw_choices:
            raise FedCoLLMError(f"{where}: expected question.stem and question.choices")
        texts = [c.get("text") if isinstance(c, dict) else None for c in raw_choices]
        labels = [str(c.get("label")) if isinstance(c, dict) else None for c in raw_choices]
        if not all(isinstance(t, str) for t in texts):
            raise FedCoLLMError(f"{where}: every choice needs a 'text' string")
        key = str(key).strip()
        if key in labels:
            answer = labels.index(key)
        elif key.isdigit() and 1 <= int(key) <= len(texts):  # a few ARC rows label 1-4
            answer = int(key) - 1
        else:
            raise FedCoLLMError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        return MCQRecord(str(obj.get("id", where)), stem, tuple(texts), answer, style)
    if isinstance(q, str):  # generic form
        choices, ans = obj.get("choices"), obj.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise FedCoLLMError(f"{where}: 'choices' must be a list of at least 2 strings")
        if isinstance(ans, str) and len(ans) == 1 and ans.isalpha():
            ans = ord(ans.upper()) - 65
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise FedCoLLMError(f"{where}: 'answer' must be a choice index or letter, got {obj.get('answer')!r}")
        return MCQRecord(str(obj.get("id", where)), q, tuple(choices), ans, style)
    raise FedCoLLMError(f"{where}: no 'question' (AI2 format object or generic string), 'prompt' "
                        "(prompt-completion form) or 'messages' (conversation)")


def read_records(path: str | Path, style: str = "arc") -> list[Record | Conversation]:
    """Read one file of MCQ, prompt-completion or conversational records (mixed too): JSON lines,
    or a Parquet file (`.parquet`, as the Hugging Face hub stores datasets) of the same fields, one
    record a row. A malformed record is an error naming the file and its line or row.
    Conversations are rendered later, by the tokenizer's chat template (chat.render)."""
    path = Path(path)
    if not path.is_file():
        raise FedCoLLMError(f"data file {str(path)!r} not found")
    records = [_parse_line(obj, style, where) for obj, where in
               (_parquet_rows(path) if path.suffix == ".parquet" else _json_lines(path))]
    if not records:
        raise FedCoLLMError(f"data file {str(path)!r} holds no records")
    return records


def _json_lines(path: Path):
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FedCoLLMError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise FedCoLLMError(f"{where}: expected a JSON object")
            yield obj, where


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq  # noqa: PLC0415 - installed with datasets

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own kinds
        raise FedCoLLMError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for n, row in enumerate(rows, 1):  # a column holds None where a row lacks the field
        yield {k: v for k, v in row.items() if v is not None}, f"{path}: row {n}"


def candidate_roots(user_path: str = "") -> list[Path]:
    """The data roots searched, in order (the hub comes after these)."""
    roots = []
    if user_path:
        roots.append(Path(user_path))
    if os.environ.get("FEDCOLLM_DATA"):
        roots.append(Path(os.environ["FEDCOLLM_DATA"]))
    checkout = Path(__file__).resolve().parents[3]  # src/fedcollm/data/loaders.py -> checkout
    for base in (checkout, Path.cwd()):
        p = (base.parent / "shared" / "data").resolve()
        if p not in roots:
            roots.append(p)
    return roots


def _from_hub(spec: DatasetSpec, split: str) -> list[Record]:
    import datasets  # noqa: PLC0415 - only users with a hub get here

    name, conf = spec.hub
    ds = datasets.load_dataset(name, conf, split=dict(spec.hub_splits)[split])
    return [_parse_line(dict(row), spec.style, f"{name}:{split}:{i}") for i, row in enumerate(ds)]


@functools.cache
def _say_missing_path(user_path: str) -> None:
    """Once a process: a typo in data.path would otherwise read the next place's data unnoticed.
    Not an error: a SuperNode that reads its part of a named dataset gets the server's data.path,
    which need not exist on its host ($FEDCOLLM_DATA there is searched next)."""
    print(f"[fedcollm] data.path {user_path!r} is not a folder on this host: looking further "
          "($FEDCOLLM_DATA, ../shared/data, the hub)", file=sys.stderr, flush=True)


def split_file(dataset: str, split: str, user_path: str = "") -> tuple[Path | None, list[str]]:
    """The local release file of one split of a named dataset, from the first data root that has
    it (None where none has), and the paths tried before."""
    if dataset not in DATASETS:
        raise FedCoLLMError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    spec = DATASETS[dataset]
    if split not in spec.files:
        raise FedCoLLMError(f"dataset {dataset!r} has no split {split!r} (known: {', '.join(spec.files)})")
    if user_path and not Path(user_path).is_dir():
        _say_missing_path(user_path)
    tried = []
    for root in candidate_roots(user_path):
        f = root / spec.files[split]
        if f.is_file():
            return f, tried
        tried.append(str(f))
    return None, tried


def load_split(dataset: str, split: str, user_path: str = "") -> list[Record]:
    """Records of one split of a named dataset, from the first place that has it."""
    found, tried = split_file(dataset, split, user_path)
    spec = DATASETS[dataset]
    if found is not None:
        return read_records(found, spec.style)
    try:
        return _from_hub(spec, split)
    except Exception as e:  # noqa: BLE001 - any hub failure ends the search
        tried.append(f"hub {spec.hub[0]} ({type(e).__name__})")
    raise FedCoLLMError(f"dataset {dataset!r} split {split!r} not found; tried: {'; '.join(tried)}")


def headline_metric(dataset: str) -> str:
    """'acc' or 'acc_norm': what the claims, dev search and traffic rule compare on `dataset`
    (acc for a dataset of your own)."""
    return DATASETS[dataset].metric if dataset in DATASETS else "acc"


def eval_split_note(dataset: str, split: str) -> str:
    """What a report adds after "test split" where the dataset's test split is its validation
    file (CommonsenseQA: no labelled test split, as in lm-eval), else ''."""
    files = DATASETS[dataset].files if dataset in DATASETS else {}
    if split == "test" and files.get("test") and files["test"] == files.get("validation"):
        return f"{dataset}: its validation split, the test split having no labels, as in lm-evaluation-harness"
    return ""


def style_of(cfg_data) -> str:
    """The prompt template of the config's dataset (also for the files that stand in for it)."""
    return DATASETS[cfg_data.dataset].style if cfg_data.dataset in DATASETS else "arc"


def load_train(cfg_data) -> list[Record]:
    """The training split the config names (data.train_file overrides the dataset's own)."""
    if cfg_data.train_file:
        return read_records(cfg_data.train_file, style_of(cfg_data))
    if cfg_data.dataset not in DATASETS:
        raise FedCoLLMError("data: this process needs the training split, but data.train_file is not set "
                            "(a client that holds its own data needs node-config train-file)")
    return load_split(cfg_data.dataset, "train", cfg_data.path)


def load_eval(cfg_data) -> list[Record]:
    """The evaluation split the config names (data.eval_file overrides the dataset's own)."""
    if cfg_data.eval_file:
        return read_records(cfg_data.eval_file, style_of(cfg_data))
    return load_split(cfg_data.dataset, cfg_data.eval_split, cfg_data.path)
