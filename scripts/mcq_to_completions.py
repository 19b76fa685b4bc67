"""Write an MCQ file's items as prompt-completion records: the lm-eval prompt and the correct answer.

    python scripts/mcq_to_completions.py IN.jsonl OUT.jsonl [--style arc|openbookqa|commonsense_qa]

A way to try instruction data on the bundled datasets: trained on, such a file gives the same
token ids, and so the same run, as the MCQ file (results/instruction-data/); as an evaluation
file, it is scored by the answers' loss instead of by accuracy.
"""

from __future__ import annotations

import argparse
import json

from fedcollm.data.loaders import read_records
from fedcollm.data.records import MCQRecord, context, continuations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--style", default="arc", help="the dataset's prompt template (data/records.py)")
    args = p.parse_args()
    records = read_records(args.source, args.style)
    other = next((r for r in records if not isinstance(r, MCQRecord)), None)
    if other is not None:
        raise SystemExit(f"{args.source}: record {other.id} is not a multiple-choice item")
    with open(args.out, "w", encoding="utf-8") as fh:
        for rec in records:
            prompt, completion = context(rec), continuations(rec)[rec.answer]
            fh.write(json.dumps({"id": rec.id, "prompt": prompt, "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
