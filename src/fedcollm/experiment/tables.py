"""The experiment's outputs: table1.md (accuracy), table2.md (traffic), results.json, table1.png.

Means and standard deviations are over seeds (sample std, ddof = 1); a seed-independent method
(zero-shot) has one value and no ±. The claims section compares methods from the numbers in the
table, whatever they are.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fedcollm.experiment.methods import LABELS, SEED_INDEPENDENT

PAPER = {"llm_vs_centralized": "97–99%", "traffic_ratio": "0.24%"}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """'51.3 ± 1.2' (scaled, e.g. to %), '51.3' for a single value, '–' for none."""
    if not values:
        return "–"
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def _values(per_seed: dict, model: str, metric: str) -> list[float]:
    return [r[model][metric] for _, r in sorted(per_seed.items()) if r.get(model)]


def _cell(per_seed: dict, model: str, metric: str, n_seeds: int, method: str) -> str:
    """mean ± std, with the number of seeds where some are still missing."""
    values = _values(per_seed, model, metric)
    expected = 1 if method in SEED_INDEPENDENT else n_seeds
    return fmt_mean_std(values) + (f" (n={len(values)})" if values and len(values) < expected else "")


def _block(results: dict, datasets: list[str], methods: list[str], model: str, metric: str,
           n_seeds: int) -> list[str]:
    lines = ["| method | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for m in methods:
        cells = [_cell(results[d].get(m, {}), model, metric, n_seeds, m) for d in datasets]
        if any(c != "–" for c in cells):
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def _paired(results: dict, dataset: str, a: str, b: str, model: str) -> list[tuple[float, float]]:
    """(a, b) accuracy pairs for the seeds both methods have."""
    ra, rb = results[dataset].get(a, {}), results[dataset].get(b, {})
    return [(ra[s][model]["acc"], rb[s][model]["acc"]) for s in sorted(ra)
            if s in rb and ra[s].get(model) and rb[s].get(model)]


def claims(results: dict, datasets: list[str]) -> list[str]:
    lines = []
    for d in datasets:
        for other in ("standalone", "fedavg"):
            pairs = _paired(results, d, "fedcollm", other, "slm")
            if pairs:
                diffs = [a - b for a, b in pairs]
                wins = sum(x > 0 for x in diffs)
                verdict = ("holds on every seed" if wins == len(diffs) else
                           "holds on average, not on every seed" if sum(diffs) > 0 else "does not hold")
                lines.append(f"- {d}: SLM FedCoLLM − {LABELS[other]} = {fmt_mean_std(diffs)} points "
                             f"(FedCoLLM better on {wins}/{len(diffs)} seeds): claim {verdict}.")
        pairs = _paired(results, d, "fedcollm", "centralized", "llm")
        if pairs:
            ratios = [a / b for a, b in pairs]
            lines.append(f"- {d}: LLM FedCoLLM / centralized = {fmt_mean_std(ratios)}% "
                         f"(paper: {PAPER['llm_vs_centralized']}).")
    return lines


def _comm(results: dict, datasets: list[str]) -> dict | None:
    for d in datasets:
        for r in results[d].get("fedcollm", {}).values():
            if r.get("comm"):
                return r["comm"]
    return None


def table2(comm: dict | None) -> str:
    lines = ["# Table 2: communication per client per round (FedCoLLM)", ""]
    if comm is None:
        return "\n".join(lines + ["No FedCoLLM run in this experiment.", ""])
    lines += [
        "| quantity | value |", "|---|---|",
        f"| adapter parameters sent (LoRA) | {comm['adapter_params']:,} |",
        f"| full SLM parameters | {comm['full_slm_params']:,} |",
        f"| parameter ratio adapter / full SLM | {100 * comm['adapter_params'] / comm['full_slm_params']:.3f}% |",
        f"| bytes up per client per round (Flower message payload) | {comm['bytes_up_per_client_round']:,.0f} |",
        f"| bytes down per client per round | {comm['bytes_down_per_client_round']:,.0f} |",
        f"| full SLM in fp32 | {comm['full_slm_fp32_bytes']:,} bytes |",
        f"| ratio bytes up / full SLM fp32 | {100 * comm['ratio']:.3f}% (paper: {PAPER['traffic_ratio']}) |",
        "",
        "Only the SLM's LoRA adapter crosses the network, up and down; the LLM never leaves the server.",
        "",
    ]
    return "\n".join(lines)


def compute_time(results: dict, datasets: list[str]) -> list[str]:
    """Per dataset: the summed wall time of its cached results (each measured when it ran, so a
    result computed while the machine was busy with something else counts its slower time)."""
    lines = []
    for d in datasets:
        secs = [r["seconds"] for per_seed in results[d].values() for r in per_seed.values() if "seconds" in r]
        if secs:
            lines.append(f"- {d}: {sum(secs) / 60:.0f} min for {len(secs)} results")
    return lines


def _commits(commits: list[str]) -> str:
    short = [c[:12] + ("-dirty" if c.endswith("-dirty") else "") for c in commits]
    return ", ".join(f"`{c}`" for c in short) or "–"


def table1(results: dict, meta: dict) -> str:
    datasets, methods = meta["datasets"], meta["methods"]
    cfg, n_seeds = meta["config"], len(meta["seeds"])
    lines = [
        "# Table 1: accuracy of the client SLM and the server LLM (%)", "",
        f"Command: `{meta['command']}`  ",
        f"Code: tables written at git commit `{meta['git_commit']}`; the results in them were computed at "
        f"{_commits(meta.get('result_commits', []))}  ",
        f"Seeds: {', '.join(map(str, meta['seeds']))} (mean ± sample std over seeds; each seed has its own "
        "split and initial adapters; zero-shot does not depend on the seed)  ",
        f"Models: LLM `{cfg['model']['llm']}`, SLM `{cfg['model']['slm'] or 'pruned LLM: first '}"
        f"{'' if cfg['model']['slm'] else str(cfg['model']['slm_keep_first']) + ' + last ' + str(cfg['model']['slm_keep_last']) + ' layers'}`; "
        f"LoRA r={cfg['lora']['r']}, α={cfg['lora']['alpha']} on {', '.join(cfg['lora']['target_modules'])}  ",
        f"Data: {cfg['data']['num_clients']} clients; training split cut into {cfg['data']['num_clients'] + 1} "
        f"equal parts ({cfg['data']['partition']}) of the first {cfg['data']['max_train_examples'] or 'all'} "
        f"shuffled training examples; evaluated on {cfg['data']['eval_examples'] or 'all'} items of the "
        f"{cfg['data']['eval_split']} split; {cfg['federation']['rounds']} rounds × "
        f"{cfg['client']['local_epochs']} local epoch(s); KD λ={cfg['distill']['kd_lambda']}, "
        f"τ={cfg['distill']['temperature']}", "",
        "## SLM (client model), acc", "", *_block(results, datasets, methods, "slm", "acc", n_seeds), "",
        "## LLM (server model), acc", "", *_block(results, datasets, methods, "llm", "acc", n_seeds), "",
        "## SLM, acc_norm", "", *_block(results, datasets, methods, "slm", "acc_norm", n_seeds), "",
        "## LLM, acc_norm", "", *_block(results, datasets, methods, "llm", "acc_norm", n_seeds), "",
        "## The paper's claims, checked on these numbers", "", *claims(results, datasets), "",
        "## Compute time (sum over the method/seed results in this table)", "",
        *compute_time(results, datasets), "",
    ]
    return "\n".join(lines)


def plot(results: dict, meta: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    datasets, methods = meta["datasets"], meta["methods"]
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 3.6 * len(datasets)), squeeze=False)
    for row, d in zip(axes, datasets):
        for ax, model in zip(row, ("slm", "llm")):
            names, means, stds = [], [], []
            for m in methods:
                vals = _values(results[d].get(m, {}), model, "acc")
                if vals:
                    mu, sd = mean_std([100 * v for v in vals])
                    names.append(LABELS.get(m, m).replace(" (", "\n("))
                    means.append(mu)
                    stds.append(sd or 0.0)
            ax.barh(range(len(names)), means, xerr=stds, color="tab:blue" if model == "slm" else "tab:orange")
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("acc (%)")
            ax.set_title(f"{d}: {model.upper()}")
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(out: Path, results: dict, meta: dict) -> dict:
    doc = {"meta": meta, "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "table1.md").write_text(table1(results, meta))
    (out / "table2.md").write_text(table2(_comm(results, meta["datasets"])))
    plot(results, meta, out / "table1.png")
    return doc
