"""The cost of differential privacy: SLM and LLM accuracy of FedCoLLM at several ε, from the
results.json of one `fedcollm experiment` per ε (same config otherwise), as a table and a plot.

    python scripts/privacy_table.py --dataset arc_easy --out results/privacy \
        inf=runs/exp-iid 8=runs/privacy-eps8 2=runs/privacy-eps2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedcollm.experiment.tables import fmt_mean_std


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="EPS=DIR", help="ε (or inf) and an experiment's output folder")
    p.add_argument("--dataset", default="arc_easy")
    p.add_argument("--method", default="fedcollm")
    p.add_argument("--out", default="results/privacy")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, doc = [], {}
    for item in args.runs:
        eps, folder = item.split("=", 1)
        exp = json.loads((Path(folder) / "results.json").read_text())
        per_seed = exp["results"][args.dataset][args.method]
        cfg = exp["meta"]["config"]
        dp = cfg.get("privacy", {"mode": "off"})
        vals = {f"{m}_{k}": [r[m][k] for r in per_seed.values()] for m in ("slm", "llm") for k in ("acc", "acc_norm")}
        doc[eps] = {"folder": folder, "seeds": sorted(per_seed), "privacy": dp, "code": exp["meta"]["result_versions"],
                    **vals}
        rows.append(f"| {eps} | {dp['mode']} | {dp.get('clipping_norm') or '–'} | "
                    f"{', '.join(sorted(per_seed))} | "
                    + " | ".join(fmt_mean_std(vals[k]) for k in ("slm_acc", "llm_acc", "slm_acc_norm", "llm_acc_norm"))
                    + " |")
    table = ["# FedCoLLM under client-level differential privacy", "",
             f"Dataset {args.dataset}, method {args.method}; mean ± sample std over seeds; δ = 1e-5. "
             "Folders and commands: README.md beside this file.", "",
             "| ε | mode | clipping norm C | seeds | SLM acc | LLM acc | SLM acc_norm | LLM acc_norm |",
             "|---|---|---|---|---|---|---|---|", *rows, ""]
    (out / "table.md").write_text("\n".join(table))
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(doc, out / "privacy.png", args.dataset)
    print("\n".join(table))


def _plot(doc: dict, path: Path, dataset: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import statistics  # noqa: PLC0415

    labels = list(doc)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model, style in (("slm", "o-"), ("llm", "s--")):
        mus = [100 * statistics.fmean(doc[e][f"{model}_acc"]) for e in labels]
        sds = [100 * statistics.stdev(doc[e][f"{model}_acc"]) if len(doc[e][f"{model}_acc"]) > 1 else 0 for e in labels]
        ax.errorbar(range(len(labels)), mus, yerr=sds, fmt=style, capsize=3, label=model.upper())
    ax.set_xticks(range(len(labels)), [f"ε = {e}" for e in labels])
    ax.set_ylabel("acc (%)")
    ax.set_title(f"{dataset}: FedCoLLM accuracy against ε (δ = 1e-5)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
