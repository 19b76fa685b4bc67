"""fedcollm's multiple-choice scores against lm-evaluation-harness's own, on one model and the same items.

The paper reports zero-shot accuracy as lm-evaluation-harness computes it, and fedcollm scores
its own way (eval/mcq.py: its prompts, one context pass shared by the choices, left padding).
This runs lm-eval itself on the same model object: its task YAML (prompt, choices, target), its
HFLM log-likelihoods and its acc / acc_norm, on the first N items of a split read from the same
local release file (turned into the hub's row layout here, as lm-eval reads it; fedcollm reads
the file through its own loader). Then it compares item by item: each choice's log-likelihood,
and which items acc and acc_norm get right.

Exit status 1 when a log-likelihood differs by more than --tolerance, or an item is right under
one scorer and wrong under the other although its two best choices are further apart than twice
the tolerance (closer than that, the order of two near-equal sums is rounding, not a protocol
difference, and the item is listed as a near tie).

    pip install -e ".[crosscheck]"      # lm-eval (scripts/setup.sh installs it)
    python scripts/check_lm_eval.py --model smollm2-135m --data arc_easy --split test --limit 200
    python scripts/check_lm_eval.py --adapter runs/latest/adapters/slm --data openbookqa --limit 100 --out check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# lm-eval's own task files, per fedcollm dataset name (lm-eval's task names are the same).
LM_EVAL_TASK_FILES = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                      "openbookqa": "openbookqa/openbookqa.yaml", "commonsense_qa": "commonsense_qa/default.yaml"}
TASK = "fedcollm_check"


def release_file(dataset: str, split: str, data_path: str) -> Path:
    """The local release file of the split, where fedcollm finds it (loaders.split_file)."""
    from fedcollm.data.loaders import split_file  # noqa: PLC0415
    from fedcollm.errors import FedCoLLMError  # noqa: PLC0415

    found, tried = split_file(dataset, split, data_path)
    if found is None:
        raise FedCoLLMError(f"{dataset} {split}: no local file (lm-eval is run on local files); tried: "
                            f"{'; '.join(tried)}")
    return found


def hub_rows(dataset: str, path: Path) -> list[dict]:
    """The release file's rows in the hub's layout, the one lm-eval's task YAML reads
    (choices: {text, label}; OpenBookQA's question under question_stem)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        q = obj["question"]
        row = {"id": obj["id"], "answerKey": obj["answerKey"],
               "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}
        row["question_stem" if dataset == "openbookqa" else "question"] = q["stem"]
        rows.append(row)
    return rows


def lm_eval_samples(model, tok, dataset: str, rows: list[dict], limit: int, max_length: int,
                    batch_size: int) -> list[dict]:
    """lm-eval's per-item samples (choice log-likelihoods, acc, acc_norm) on the first `limit` rows,
    through a task that includes lm-eval's own YAML with only the data source changed."""
    import lm_eval  # noqa: PLC0415
    import lm_eval.tasks  # noqa: PLC0415
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[:limit]), encoding="utf-8")
        (Path(tmp) / f"{TASK}.yaml").write_text(json.dumps({  # JSON is YAML
            "include": str(Path(lm_eval.tasks.__file__).parent / LM_EVAL_TASK_FILES[dataset]),
            "task": TASK, "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "training_split": None, "validation_split": None, "test_split": "test"}), encoding="utf-8")
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)
        out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=0, log_samples=True,
                                      task_manager=lm_eval.tasks.TaskManager(include_path=tmp, include_defaults=False))
    return sorted(out["samples"][TASK], key=lambda s: s["doc_id"])


def compare(ours: list[list[float]], ours_right: dict, samples: list[dict], ids: list[str], tol: float) -> dict:
    """Item by item: the largest log-likelihood difference, and the items one scorer gets right and
    the other not (split into real differences and near ties)."""
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    diffs = [abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t)]
    out = {"max_abs_loglik_diff": max(diffs), "choices_compared": len(diffs), "differ": {}, "near_ties": {}}
    for metric, right in ours_right.items():
        differ, ties = [], []
        for k, (s, o) in enumerate(zip(samples, ours)):
            if int(s[metric]) != right[k]:
                top = sorted(o, reverse=True)
                (ties if len(top) > 1 and top[0] - top[1] <= 2 * tol else differ).append(ids[k])
        out["differ"][metric], out["near_ties"][metric] = differ, ties
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch  # noqa: PLC0415

    from fedcollm.cli import _add_model_args, _base_of_run, _model  # noqa: PLC0415 - the CLI's own model loading
    from fedcollm.data.encode import pad_id_of  # noqa: PLC0415
    from fedcollm.data.loaders import DATASETS, read_records  # noqa: PLC0415
    from fedcollm.errors import FedCoLLMError  # noqa: PLC0415
    from fedcollm.eval.mcq import accuracy, choice_logliks, encode_requests  # noqa: PLC0415
    from fedcollm.eval.metrics import item_key  # noqa: PLC0415
    from fedcollm.models.loading import load_tokenizer  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _add_model_args(p)
    p.add_argument("--data", required=True, choices=sorted(LM_EVAL_TASK_FILES))
    p.add_argument("--split", default="test")
    p.add_argument("--data-path", default="", help="a data root searched first (as fedcollm eval --data-path)")
    p.add_argument("--limit", type=int, default=100, help="the first N items (lm-eval's --limit)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens, for both scorers")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=1e-3, help="log-likelihood difference allowed (nats)")
    p.add_argument("--out", help="also write the comparison here (JSON)")
    args = p.parse_args(argv)
    args.command = "check_lm_eval"
    if args.limit < 1:
        p.error(f"--limit {args.limit}: at least 1 item")
    try:
        _base_of_run(args)
        found = release_file(args.data, args.split, args.data_path)
        rows = hub_rows(args.data, found)  # lm-eval's rows, and fedcollm's records, of one file
        records = read_records(found, DATASETS[args.data].style)[: args.limit]
        if [r.id for r in records] != [r["id"] for r in rows[: args.limit]]:
            raise FedCoLLMError(f"{args.data} {args.split}: fedcollm's loader and this script read different items")
        tok = load_tokenizer(args.model)
        model = _model(args, torch.device("cpu"), torch.float32)
        logliks = choice_logliks(model, encode_requests(tok, records, args.max_length), batch_size=args.batch_size,
                                 device=torch.device("cpu"), pad_id=pad_id_of(tok), progress=True, desc="fedcollm")
        ours = accuracy(records, logliks)
        samples = lm_eval_samples(model, tok, args.data, rows, args.limit, args.max_length, args.batch_size)
    except FedCoLLMError as e:
        print(f"check_lm_eval: error: {e}", file=sys.stderr)
        return 2
    import lm_eval  # noqa: PLC0415

    n = len(samples)
    # What lm-eval's task reports (its CommonsenseQA: acc only; over one-letter choices acc_norm is acc).
    metrics = [m for m in ("acc", "acc_norm") if m in samples[0]]
    result = {"model": args.model, "adapter": args.adapter, "prune": args.prune, "data": args.data,
              "split": args.split, "n": n, "lm_eval_version": lm_eval.__version__, "tolerance": args.tolerance,
              "fedcollm": {m: ours[m] for m in metrics},
              "lm_eval": {m: sum(float(s[m]) for s in samples) / n for m in metrics},
              **compare(logliks, {m: ours[item_key(m)] for m in metrics}, samples, [r.id for r in records],
                        args.tolerance)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))
    for m in metrics:
        print(f"{m:>8}: fedcollm {100 * result['fedcollm'][m]:.2f}  lm-eval {100 * result['lm_eval'][m]:.2f}  "
              f"(n {n}; items that differ {len(result['differ'][m])}, near ties {len(result['near_ties'][m])})")
    print(f"largest log-likelihood difference: {result['max_abs_loglik_diff']:.2e} nats over "
          f"{result['choices_compared']} choices (tolerance {args.tolerance:g})")
    bad = result["max_abs_loglik_diff"] > args.tolerance or any(result["differ"].values())
    if bad:
        print("check_lm_eval: FAILED: fedcollm does not score these items as lm-eval does", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
