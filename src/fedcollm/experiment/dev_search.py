"""Hyperparameters chosen on held-out data, never on test (issue #12): a grid of config values,
each cell run on every dataset's dev split, the best cell chosen from the numbers.

    fedcollm experiment --config configs/experiment-gpu.toml --jobs 6 --out runs/dev-gpu \
        --datasets arc_easy,openbookqa,commonsense_qa \
        --dev-grid "client.lr+distill.lr=3e-4,1e-3,3e-3;client.local_epochs=1,2"

A grid axis is `key=v1,v2,…`; `key1+key2=…` sets both keys to each value (one learning rate
for the clients and the server KD). The dev split of a dataset is its validation split, or,
where that is what is scored as test (CommonsenseQA, as lm-eval does) or where there is none,
items held out of its training split (data.eval_split = "train_holdout").

Each cell runs FedCoLLM, standalone and centralized by default (what the paper's claims
compare). The choice: the cell whose FedCoLLM SLM and LLM accuracy, averaged together and over
the datasets (and seeds), is highest — one setting for the whole table, the paper's practice.
Writes dev.md (every cell and the choice), dev.json and dev.png.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from fedcollm.config import Config
from fedcollm.data.loaders import DATASETS, headline_metric
from fedcollm.errors import FedCoLLMError
from fedcollm.experiment.runner import Cache, Job, check_methods
from fedcollm.experiment.tables import code_line, fmt_mean_std, seed_values

METHODS = ("fedcollm", "standalone", "centralized")


@dataclasses.dataclass(frozen=True)
class Cell:
    overrides: tuple[str, ...]  # "key=value", as --set takes them

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


def parse_dev_grid(text: str) -> list[Cell]:
    """'a+b=1,2;c=x,y' → every combination, first axis slowest."""
    cells = [()]
    for part in filter(None, (p.strip() for p in text.split(";"))):
        keys, _, values = part.partition("=")
        names = [k.strip() for k in keys.split("+") if k.strip()]
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not names or not vals:
            raise FedCoLLMError(f"--dev-grid {text!r}: expected 'key=v1,v2;key2+key3=v1,v2', got {part!r}")
        cells = [(*c, *(f"{k}={v}" for k in names)) for c in cells for v in vals]
    if cells == [()]:
        raise FedCoLLMError(f"--dev-grid {text!r}: no axis given")
    return [Cell(c) for c in cells]


def dev_split(dataset: str) -> str:
    """The validation split, unless it is the one scored as test or the dataset has none."""
    spec = DATASETS.get(dataset)
    if spec is None or "validation" not in spec.files or spec.files["validation"] == spec.files.get("test"):
        return "train_holdout"
    return "validation"


def run_dev_search(config_of: Callable[[Cell, str, int], Config], cells: list[Cell], datasets: list[str],
                   seeds: list[int], methods: list[str], out: Path, command: str, compute: bool = True,
                   allow_mixed: bool = False, parallel: int = 1) -> dict:
    """Every (cell, dataset, seed, method) job, cached like the experiment's; then the tables.
    config_of(cell, dataset, seed): the job's config (on the dataset's dev split)."""
    check_methods(methods)
    if "fedcollm" not in methods:
        raise FedCoLLMError("--dev-grid: the choice is made on FedCoLLM's accuracy; keep fedcollm in --methods")
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out, compute, allow_mixed)
    combos = [(c, d, s, m) for s in seeds for c in cells for d in datasets for m in methods]
    jobs = [Job(config_of(c, d, s), m, str(s), f"[dev] ({i}/{len(combos)}) {d} {c.label} {m} seed {s}",
                (d, c.label, m, str(s))) for i, (c, d, s, m) in enumerate(combos, 1)]
    results: dict = {d: {c.label: {m: {} for m in methods} for c in cells} for d in datasets}
    for (d, label, m, seed), result in cache.run(jobs, parallel).items():
        results[d][label][m][seed] = result
    cache.check_one_version()
    meta = cache.meta(command, config_of(cells[0], datasets[0], seeds[0]), datasets=datasets, seeds=seeds,
                      methods=methods, cells=[c.label for c in cells],
                      dev_splits={d: dev_split(d) for d in datasets})
    doc = {"meta": meta, "results": results, "choice": choose(results, [c.label for c in cells], seeds)}
    (out / "dev.json").write_text(json.dumps(doc) + "\n")
    (out / "dev.md").write_text(table(doc))
    plot(doc, out / "dev.png")
    return doc


def score(per_seed: dict, metric: str) -> float | None:
    """FedCoLLM's SLM and LLM dev accuracy (the dataset's headline metric), averaged together and over seeds."""
    values = seed_values(per_seed, "slm", metric) + seed_values(per_seed, "llm", metric)
    return statistics.fmean(values) if values else None


def choose(results: dict, labels: list[str], seeds: list[int]) -> dict:
    """The cell with the best score averaged over datasets, among cells complete on every one;
    also each dataset's own best (shown, not used)."""
    complete = [lab for lab in labels if all(len(results[d][lab]["fedcollm"]) == len(seeds) for d in results)]
    per_dataset = {}
    for d, per_cell in results.items():
        scored = {lab: score(per_cell[lab]["fedcollm"], headline_metric(d)) for lab in complete}
        per_dataset[d] = max(scored, key=scored.get) if scored else None
    if not complete:
        return {"label": None, "why": "no cell has FedCoLLM results for every seed on every dataset yet",
                "per_dataset": per_dataset}
    overall = {lab: statistics.fmean(score(results[d][lab]["fedcollm"], headline_metric(d)) for d in results)
               for lab in complete}
    best = max(complete, key=overall.get)  # the first in grid order on a tie
    return {"label": best, "score": overall[best], "complete_cells": len(complete), "per_dataset": per_dataset}


def _acc(per_seed: dict, model: str, metric: str) -> str:
    return fmt_mean_std(seed_values(per_seed, model, metric))


def table(doc: dict) -> str:
    meta, results, choice = doc["meta"], doc["results"], doc["choice"]
    cfg = meta["config"]
    lines = ["# Dev search: hyperparameters chosen on held-out data", "", f"Command: `{meta['command']}`  ",
             code_line(meta), f"Seeds {', '.join(map(str, meta['seeds']))} (%, mean ± sample std over seeds); "
             f"rounds {cfg['federation']['rounds']}, batch {cfg['client']['batch_size']} (client) / "
             f"{cfg['distill']['batch_size']} (KD) unless a cell sets them. Score: FedCoLLM's SLM and LLM accuracy "
             "averaged, in each dataset's headline metric (acc, or acc_norm where right answers tend to be the longest "
             "choice; data/loaders.py).", ""]
    for d, per_cell in results.items():
        metric = headline_metric(d)
        lines += [f"## {d} (dev split: {meta['dev_splits'][d]}; {metric})", "",
                  "| cell | FedCoLLM SLM | FedCoLLM LLM | score | standalone SLM | centralized LLM |",
                  "|---|---|---|---|---|---|"]
        for label, per_method in per_cell.items():
            fed = per_method.get("fedcollm", {})
            s = score(fed, metric)
            lines.append(f"| {label} | {_acc(fed, 'slm', metric)} | {_acc(fed, 'llm', metric)} | "
                         f"{'–' if s is None else f'{100 * s:.1f}'} | "
                         f"{_acc(per_method.get('standalone', {}), 'slm', metric)} | "
                         f"{_acc(per_method.get('centralized', {}), 'llm', metric)} |")
        lines.append("")
    lines += ["## Choice", ""]
    if choice["label"] is None:
        lines.append(f"None yet: {choice['why']}.")
    else:
        lines.append(f"**{choice['label']}**: best score averaged over the datasets ({100 * choice['score']:.1f}; "
                     f"{choice['complete_cells']} complete cells). Each dataset's own best: " +
                     "; ".join(f"{d}: {lab}" for d, lab in choice["per_dataset"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    results = doc["results"]
    width = max(4.0, 1.0 * len(doc["meta"]["cells"]))  # per dataset
    fig, axes = plt.subplots(1, len(results), figsize=(width * len(results), 4.5), squeeze=False)
    for ax, (d, per_cell) in zip(axes[0], results.items()):
        labels, metric = list(per_cell), headline_metric(d)
        for k, (model, method, color) in enumerate((("slm", "fedcollm", "tab:blue"), ("llm", "fedcollm", "tab:orange"),
                                                    ("slm", "standalone", "tab:cyan"), ("llm", "centralized", "tab:red"))):
            ys = [statistics.fmean(v) * 100 if (v := seed_values(per_cell[lab].get(method, {}), model, metric)) else None
                  for lab in labels]
            xs = [i + (k - 1.5) * 0.18 for i in range(len(labels))]
            ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width=0.18,
                   color=color, label=f"{method} {model.upper()}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lab.replace(" ", "\n") for lab in labels], fontsize=6)
        ax.set_ylabel(f"dev {metric} (%)")
        ax.set_title(f"{d} ({doc['meta']['dev_splits'][d]})")
        ax.legend(fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
