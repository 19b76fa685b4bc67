"""Write an MCQ file's items as instruction records: prompt-completion records (the lm-eval prompt
and the correct answer), or conversations of several questions.

    python scripts/mcq_to_completions.py IN.jsonl OUT.jsonl [--style arc|openbookqa|commonsense_qa]
    python scripts/mcq_to_completions.py IN.jsonl OUT.jsonl --turns 2

A way to try instruction data on the bundled datasets: trained on, a prompt-completion file gives
the same token ids, and so the same run, as the MCQ file (results/instruction-data/); as an
evaluation file, it is scored by the answers' loss instead of by accuracy. With `--turns N`, each
run of N consecutive items becomes one conversation in TRL's `messages` form: the user asks each
question (its choices listed), the assistant answers with the correct choice, and every answer is
learnt (data/chat.py).
"""

from __future__ import annotations

import argparse
import json

from fedcollm.data.loaders import read_records
from fedcollm.data.records import MCQRecord, context, continuations


def _asked(rec: MCQRecord) -> list[dict]:
    choices = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(rec.choices))
    return [{"role": "user", "content": f"{rec.question.strip()}\n{choices}"},
            {"role": "assistant", "content": rec.choices[rec.answer]}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--style", default="arc", help="the dataset's prompt template (data/records.py)")
    p.add_argument("--turns", type=int, default=0, help="N ≥ 1: conversations of N questions each (a last, "
                   "shorter one holds what is left)")
    args = p.parse_args()
    records = read_records(args.source, args.style)
    other = next((r for r in records if not isinstance(r, MCQRecord)), None)
    if other is not None:
        raise SystemExit(f"{args.source}: record {other.id} is not a multiple-choice item")
    if args.turns < 0:
        raise SystemExit(f"--turns {args.turns}: must be 0 (prompt-completion records) or more")
    with open(args.out, "w", encoding="utf-8") as fh:
        if args.turns:
            for k in range(0, len(records), args.turns):
                group = records[k:k + args.turns]
                messages = [m for rec in group for m in _asked(rec)]
                fh.write(json.dumps({"id": "+".join(r.id for r in group), "messages": messages}) + "\n")
            return
        for rec in records:
            prompt, completion = context(rec), continuations(rec)[rec.answer]
            fh.write(json.dumps({"id": rec.id, "prompt": prompt, "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
