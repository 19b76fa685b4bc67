"""The experiment's outputs: table1.md (accuracy, or loss), table2.md (traffic), results.json,
table1.png.

Means and standard deviations are over seeds (sample std, ddof = 1); a seed-independent method
(zero-shot) has one value and no ±. The claims section compares methods from the numbers in the
table, whatever they are, in each dataset's headline metric (`metric_of`: acc, or acc_norm where
right answers tend to be the longest choice; loss, lower being better, on a dataset whose
evaluation set is prompt-completion data).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fedcollm.data.loaders import eval_split_note, headline_metric
from fedcollm.eval.metrics import COMPLETION, ITEMS, LOWER_IS_BETTER, MCQ, METRICS, item_key
from fedcollm.experiment.methods import LABELS, SEED_INDEPENDENT
from fedcollm.experiment.significance import BOOTSTRAP_SAMPLES, Interval, paired_bootstrap

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


def metric_of(per_method: dict, dataset: str) -> str:
    """The metric a dataset's claims compare: loss where its results are losses (a
    prompt-completion evaluation set), else its headline accuracy."""
    scored = (r.get(m) or {} for seeds in per_method.values() for r in seeds.values() for m in ("slm", "llm"))
    return "loss" if any("loss" in s for s in scored) else headline_metric(dataset)


def _scale(metric: str) -> tuple[float, int]:
    """(factor, decimals) a metric is shown with: accuracies in %, losses as they are."""
    return (1.0, 3) if metric in LOWER_IS_BETTER else (100.0, 1)


def fmt_metric(values: list[float], metric: str) -> str:
    return fmt_mean_std(values, *_scale(metric))


def seed_values(per_seed: dict, model: str, metric: str) -> list[float]:
    return [r[model][metric] for _, r in sorted(per_seed.items()) if r.get(model)]


def _cell(per_seed: dict, model: str, metric: str, n_seeds: int, method: str) -> str:
    """mean ± std, with the number of seeds where some are still missing."""
    values = seed_values(per_seed, model, metric)
    expected = 1 if method in SEED_INDEPENDENT else n_seeds
    return fmt_metric(values, metric) + (f" (n={len(values)})" if values and len(values) < expected else "")


def _block(results: dict, datasets: list[str], methods: list[str], model: str, metric: str,
           n_seeds: int) -> list[str]:
    lines = ["| method | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for m in methods:
        cells = [_cell(results[d].get(m, {}), model, metric, n_seeds, m) for d in datasets]
        if any(c != "–" for c in cells):
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def _paired(results: dict, dataset: str, a: str, b: str, model: str) -> list[tuple[float, float]]:
    """(a, b) headline-metric pairs for the seeds both methods have."""
    ra, rb, metric = results[dataset].get(a, {}), results[dataset].get(b, {}), metric_of(results[dataset], dataset)
    return [(ra[s][model][metric], rb[s][model][metric]) for s in sorted(ra)
            if s in rb and ra[s].get(model) and rb[s].get(model)]


def _scored_pairs(ra: dict, rb: dict, model: str, key: str) -> tuple[list[str], list, list]:
    """Seeds where both sides' results (seed → result) kept `model`'s per-item scores under `key`,
    and those scores (seeds × items)."""
    seeds = [s for s in sorted(ra) if s in rb and (ra[s].get(model) or {}).get(key)
             and (rb[s].get(model) or {}).get(key)]
    return seeds, [ra[s][model][key] for s in seeds], [rb[s][model][key] for s in seeds]


def _items(results: dict, dataset: str, a: str, b: str, model: str) -> tuple[list[str], list, list]:
    """Seeds where both methods kept per-item scores (headline metric), and those scores (seeds × items)."""
    return _scored_pairs(results[dataset].get(a, {}), results[dataset].get(b, {}), model,
                         item_key(metric_of(results[dataset], dataset)))


def _sizes(results: dict, dataset: str, a: str, model: str, seed: str) -> list[float] | None:
    """The items' completion-token counts where the metric is a loss (its per-item scores are
    summed losses: the loss of a resample is their sum over these), else None."""
    if metric_of(results[dataset], dataset) != "loss":
        return None
    return results[dataset][a][seed][model][ITEMS[COMPLETION][1]]


def _ci(iv: Interval, statistic: str, metric: str = "acc") -> str:
    """+3.8 [+1.2, +6.3] (accuracy points), −0.052 [−0.081, −0.020] (loss) or 89.2% [85.0, 93.1]."""
    if statistic == "diff":
        k, d = _scale(metric)
        return f"{k * iv.value:+.{d}f} [{k * iv.low:+.{d}f}, {k * iv.high:+.{d}f}]"
    return f"{100 * iv.value:.1f}% [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def _claim_row(results: dict, d: str, a: str, b: str, model: str, what: str, statistic: str,
               verdict) -> str | None:
    pairs = _paired(results, d, a, b, model)
    if not pairs:
        return None
    metric = metric_of(results[d], d)
    seeds, xa, xb = _items(results, d, a, b, model)
    if not seeds:
        return (f"| {d} | {metric} | {what} | – | – | no per-item scores kept "
                "(results older than the paired test) |")
    sizes = _sizes(results, d, a, model, seeds[0])
    per_seed = "; ".join(f"s{s}: {_ci(paired_bootstrap([x], [y], statistic, sizes=sizes), statistic, metric)}"
                         for s, x, y in zip(seeds, xa, xb))
    pooled = paired_bootstrap(xa, xb, statistic, sizes=sizes)
    # A result continued after its last round by older code kept its accuracy but not its items
    # (session 15): the test then pools fewer seeds than the table's means, and says so.
    short = f"; {len(pairs) - len(seeds)} more without per-item scores" if len(pairs) > len(seeds) else ""
    return (f"| {d} | {metric} | {what} | {per_seed} | {_ci(pooled, statistic, metric)} ({len(seeds)} seeds{short}) "
            f"| {verdict(pooled, metric)} |")


def _diff_verdict(iv: Interval, metric: str) -> str:
    if not iv.significant:
        return "not significant (the interval covers 0)"
    better = iv.value < 0 if metric in LOWER_IS_BETTER else iv.value > 0
    return "holds: significantly better" if better else "does not hold: significantly worse"


def _ratio_verdict(target: float):
    def verdict(iv: Interval, metric: str) -> str:
        if iv.low >= target:
            return f"holds: ≥ {100 * target:.0f}% at 95%"
        if iv.high < target:
            return f"does not hold: < {100 * target:.0f}% at 95%"
        return f"undecided: the interval covers {100 * target:.0f}%"
    return verdict


def claims(results: dict, datasets: list[str]) -> list[str]:
    """The paper's claims with a paired bootstrap over the test items (95% intervals), per seed
    and pooled, plus how many seeds each holds on."""
    lines = ["| dataset | metric | claim | per seed (95% CI) | pooled (95% CI) | verdict |", "|---|---|---|---|---|---|"]
    for d in datasets:
        for other in ("standalone", "fedavg"):
            row = _claim_row(results, d, "fedcollm", other, "slm", f"SLM: FedCoLLM − {LABELS[other]}", "diff",
                             _diff_verdict)
            if row:
                lines.append(row)
        row = _claim_row(results, d, "fedcollm", "centralized", "llm", "LLM: FedCoLLM − centralized", "diff",
                         _diff_verdict)
        if row:
            lines.append(row)
        if metric_of(results[d], d) in LOWER_IS_BETTER:  # a share of centralized is a share of accuracy
            continue
        row = _claim_row(results, d, "fedcollm", "centralized", "llm",
                         f"LLM: FedCoLLM / centralized (paper: {PAPER['llm_vs_centralized']})", "ratio",
                         _ratio_verdict(0.97))
        if row:
            lines.append(row)
    lines.append("")
    for d in datasets:  # the seed counts, for a reader who wants them
        metric = metric_of(results[d], d)
        sign = -1 if metric in LOWER_IS_BETTER else 1
        for other in ("standalone", "fedavg"):
            pairs = _paired(results, d, "fedcollm", other, "slm")
            if pairs:
                diffs = [a - b for a, b in pairs]
                lines.append(f"- {d}: SLM {metric} FedCoLLM − {LABELS[other]} = {fmt_metric(diffs, metric)} "
                             f"{'' if sign < 0 else 'points '}over seeds "
                             f"(FedCoLLM better on {sum(sign * x > 0 for x in diffs)}/{len(diffs)} seeds).")
        pairs = _paired(results, d, "fedcollm", "centralized", "llm")
        if pairs and sign > 0:
            lines.append(f"- {d}: LLM {headline_metric(d)} FedCoLLM / centralized = "
                         f"{fmt_mean_std([a / b for a, b in pairs])}% over seeds "
                         f"(paper: {PAPER['llm_vs_centralized']}).")
    return lines if len(lines) > 3 else []


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
    full = comm["full_slm_fp32_bytes"]
    lines += [
        "| quantity | value |", "|---|---|",
        f"| adapter parameters sent (LoRA) | {comm['adapter_params']:,} |",
        f"| full SLM parameters | {comm['full_slm_params']:,} |",
        f"| parameter ratio adapter / full SLM | {100 * comm['adapter_params'] / comm['full_slm_params']:.3f}% |",
        f"| adapter encoding on the wire | {comm.get('transport', 'not recorded (a run from before it was)')} |",
        f"| bytes up per client per round (Flower message payload) | {comm['bytes_up_per_client_round']:,.0f} |",
        f"| bytes down per client per round | {comm['bytes_down_per_client_round']:,.0f} |",
        f"| full SLM in fp32 | {comm['full_slm_fp32_bytes']:,} bytes |",
        f"| ratio bytes up / full SLM fp32 | {100 * comm['bytes_up_per_client_round'] / full:.3f}% "
        f"(paper: {PAPER['traffic_ratio']}) |",
        f"| ratio bytes down / full SLM fp32 | {100 * comm['bytes_down_per_client_round'] / full:.3f}% |",
        "",
        "Only the SLM's LoRA adapter crosses the network, up and down; the LLM never leaves the server.",
        "",
    ]
    return "\n".join(lines)


def compute_time(results: dict, datasets: list[str]) -> list[str]:
    """Per dataset: the summed wall time of its cached results (each measured when it ran, so a
    result computed while the machine was busy with something else counts its slower time; a
    job continued after an earlier try was cut short counts its last try only, and is said)."""
    lines = []
    for d in datasets:
        timed = [r for per_seed in results[d].values() for r in per_seed.values() if "seconds" in r]
        if timed:
            continued = sum(bool(r.get("continued")) for r in timed)
            note = f" ({continued} of them continued where a try was cut short: that try's time is not in it)"
            lines.append(f"- {d}: {sum(r['seconds'] for r in timed) / 60:.0f} min for {len(timed)} results"
                         + (note if continued else ""))
    return lines


def code_line(meta: dict) -> str:
    versions = meta.get("result_versions", {})
    listed = ", ".join(f"`{v}` ({n})" for v, n in versions.items()) or "–"
    line = (f"Code: results computed by code version {listed} (fedcollm.version: a digest of the package source); "
            f"tables written by `{meta['code_version']}` at git commit `{meta['git_commit'][:12]}`  ")
    if len(versions) > 1:
        line = (f"**Mixed code versions** (allowed by --allow-mixed-versions): these results come from "
                f"{len(versions)} different versions of the code, so differences between rows may be code, "
                f"not method.  \n" + line)
    return line


def split_words(split: str, datasets: list[str]) -> str:
    """'<split> split', naming the datasets whose test split is their validation file (CommonsenseQA)."""
    notes = "; ".join(filter(None, (eval_split_note(d, split) for d in datasets)))
    return f"{split} split" + (f" ({notes})" if notes else "")


def train_words(max_train_examples: int) -> str:
    """What the five parts were cut from: 0 means the whole training split."""
    if max_train_examples:
        return f"the first {max_train_examples:,} shuffled training examples"
    return "all the shuffled training examples"


def items_scored(dataset: str, per_method: dict) -> str:
    """How many items a dataset's results were scored on ('2,376'), read off their per-item scores,
    which every result since the paired test keeps; '–' where none has them."""
    keys = (ITEMS[MCQ][0], ITEMS[COMPLETION][0])
    counts = {len(r[model][key]) for seeds in per_method.values() for r in seeds.values()
              for model in ("slm", "llm") for key in keys if (r.get(model) or {}).get(key)}
    if len(counts) > 1:  # a table's methods are scored on one split: refuse rather than print one n
        raise ValueError(f"{dataset}: results scored on different numbers of items: {sorted(counts)}")
    return f"{counts.pop():,}" if counts else "–"


UNITS = {"acc": "%", "acc_norm": "%", "loss": "nats per answer token, lower is better",
         "ppl": "perplexity, lower is better"}


def _blocks(results: dict, meta: dict) -> list[str]:
    """An SLM and an LLM block per figure the datasets hold: acc and acc_norm, and/or loss and ppl."""
    datasets = meta["datasets"]
    kinds = [COMPLETION if metric_of(results[d], d) == "loss" else MCQ for d in datasets]
    lines = []
    for metric in (m for kind in dict.fromkeys(kinds) for m in METRICS[kind]):
        shown = [d for d, kind in zip(datasets, kinds) if metric in METRICS[kind]]
        for model, who in (("slm", "SLM (client model)"), ("llm", "LLM (server model)")):
            lines += [f"## {who}, {metric} ({UNITS[metric]})", "",
                      *_block(results, shown, meta["methods"], model, metric, len(meta["seeds"])), ""]
    return lines


def table1(results: dict, meta: dict) -> str:
    datasets = meta["datasets"]
    cfg = meta["config"]
    losses = any(metric_of(results[d], d) == "loss" for d in datasets)
    lines = [
        "# Table 1: " + ("the client SLM and the server LLM" if losses else
                         "accuracy of the client SLM and the server LLM (%)"), "",
        f"Command: `{meta['command']}`  ",
        code_line(meta),
        f"Seeds: {', '.join(map(str, meta['seeds']))} (mean ± sample std over seeds; each seed has its own "
        "split and initial adapters; zero-shot does not depend on the seed)  ",
        f"Models: LLM `{cfg['model']['llm']}`, SLM `{cfg['model']['slm'] or 'pruned LLM: first '}"
        f"{'' if cfg['model']['slm'] else str(cfg['model']['slm_keep_first']) + ' + last ' + str(cfg['model']['slm_keep_last']) + ' layers'}`; "
        f"LoRA r={cfg['lora']['r']}, α={cfg['lora']['alpha']} on {', '.join(cfg['lora']['target_modules'])}  ",
        f"Data: {cfg['data']['num_clients']} clients; training split cut into {cfg['data']['num_clients'] + 1} "
        f"equal parts ({cfg['data']['partition']}) of {train_words(cfg['data']['max_train_examples'])}; "
        + (f"evaluated on items of `{cfg['data']['eval_file']}` (n below)" if cfg["data"].get("eval_file") else
           f"evaluated on {cfg['data']['eval_examples'] or 'all'} items of the "
           f"{split_words(cfg['data']['eval_split'], datasets)}")
        + f"; {cfg['federation']['rounds']} rounds × "
        f"{cfg['client']['local_epochs']} local epoch(s); KD λ={cfg['distill']['kd_lambda']}, "
        f"τ={cfg['distill']['temperature']}  ",
        "Items scored (n, the same for every method and seed): "
        + "; ".join(f"{d} {items_scored(d, results[d])}" for d in datasets), "",
        *_blocks(results, meta),
        "## The paper's claims, checked on these numbers", "",
        "In each dataset's headline metric (" + ", ".join(f"{d}: {metric_of(results[d], d)}" for d in datasets)
        + ("; acc_norm where right answers tend to be the longest choice, see data/loaders.py"
           if not all(metric_of(results[d], d) == "loss" for d in datasets) else "")
        + ("; loss on prompt-completion data, where lower is better and the LLM's share of centralized "
           "accuracy is not defined" if losses else "") + "). "
        "Paired bootstrap over the test items (both methods scored on the same items; "
        f"{BOOTSTRAP_SAMPLES} resamples; differences in accuracy points"
        + (" or in loss, resampled as the loss summed over the items' answer tokens" if losses else "")
        + ", ratios in %); a claim holds when its 95% interval lies on the claimed side.", "",
        *claims(results, datasets), "",
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
            metric = metric_of(results[d], d)
            for m in methods:
                vals = seed_values(results[d].get(m, {}), model, metric)
                if vals:
                    mu, sd = mean_std([_scale(metric)[0] * v for v in vals])
                    names.append(LABELS.get(m, m).replace(" (", "\n("))
                    means.append(mu)
                    stds.append(sd or 0.0)
            ax.barh(range(len(names)), means, xerr=stds, color="tab:blue" if model == "slm" else "tab:orange")
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"{metric} ({UNITS[metric]})")
            ax.set_title(f"{d}: {model.upper()}")
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(out: Path, results: dict, meta: dict) -> dict:
    doc = {"meta": meta, "results": results}
    (out / "results.json").write_text(json.dumps(doc) + "\n")
    (out / "table1.md").write_text(table1(results, meta))
    (out / "table2.md").write_text(table2(_comm(results, meta["datasets"])))
    plot(results, meta, out / "table1.png")
    return doc


def aux_size_table(results: dict, meta: dict) -> str:
    fractions, methods = meta["fractions"], meta["methods"]
    lines = [f"# Accuracy against the size of the auxiliary part: {meta['dataset']}", "",
             f"Command: `{meta['command']}`  ", code_line(meta),
             f"Seeds: {', '.join(map(str, meta['seeds']))} (mean ± sample std); the rest of the training split "
             f"is cut into {meta['config']['data']['num_clients']} client parts; evaluated on "
             f"{meta['config']['data']['eval_examples'] or 'all'} items of the "
             f"{split_words(meta['config']['data']['eval_split'], [meta['dataset']])}. The paper's setup is 20%.", "",
             "| aux share | aux examples | method | SLM acc | LLM acc | SLM acc_norm | LLM acc_norm |",
             "|---|---|---|---|---|---|---|"]
    for f in fractions:
        for m in methods:
            per_seed = results[str(f)][m]
            sizes = sorted({r.get("aux_examples") for r in per_seed.values() if r.get("aux_examples")})
            cells = [fmt_mean_std(seed_values(per_seed, model, metric)) for metric in ("acc", "acc_norm")
                     for model in ("slm", "llm")]
            lines.append(f"| {100 * f:g}% | {', '.join(map(str, sizes)) or '–'} | {LABELS.get(m, m)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines + _aux_against_paper(results, meta)) + "\n"


PAPER_AUX_SHARE = 0.2


def _aux_against_paper(results: dict, meta: dict) -> list[str]:
    """Each other share against the paper's 20%, by a paired bootstrap over the items scored (the
    same items for every share), pooled over the seeds both have: which differences are real."""
    if PAPER_AUX_SHARE not in meta["fractions"]:
        return []
    dataset, metric = meta["dataset"], headline_metric(meta["dataset"])
    key, rows = item_key(metric), []
    for f in (f for f in meta["fractions"] if f != PAPER_AUX_SHARE):
        for m in meta["methods"]:
            cells = []
            for model in ("slm", "llm"):
                seeds, xa, xb = _scored_pairs(results[str(f)][m], results[str(PAPER_AUX_SHARE)][m], model, key)
                if not seeds:
                    cells.append("–")
                    continue
                iv = paired_bootstrap(xa, xb)
                cells.append(f"{_ci(iv, 'diff')} ({len(seeds)} seeds){'' if iv.significant else ', n.s.'}")
            rows.append(f"| {100 * f:g}% | {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return ["", f"## Against the paper's {100 * PAPER_AUX_SHARE:g}%", "",
            f"{dataset} {metric}, in points: each share's accuracy minus that at {100 * PAPER_AUX_SHARE:g}%, "
            f"paired bootstrap over the items scored ({BOOTSTRAP_SAMPLES} resamples, 95% interval, the "
            "seeds both shares have pooled); n.s.: the interval covers 0.", "",
            f"| aux share | method | SLM − at {100 * PAPER_AUX_SHARE:g}% | LLM − at {100 * PAPER_AUX_SHARE:g}% |",
            "|---|---|---|---|", *rows]


def plot_aux_size(results: dict, meta: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in meta["methods"]:
        for model, style in (("slm", "o-"), ("llm", "s--")):
            xs, mus, sds = [], [], []
            for f in meta["fractions"]:
                vals = seed_values(results[str(f)][m], model, headline_metric(meta["dataset"]))
                if vals:
                    mu, sd = mean_std([100 * v for v in vals])
                    xs.append(100 * f)
                    mus.append(mu)
                    sds.append(sd or 0.0)
            if xs:
                ax.errorbar(xs, mus, yerr=sds, fmt=style, capsize=3, label=f"{LABELS.get(m, m)}: {model.upper()}")
    ax.set_xlabel("auxiliary part (% of the training split)")
    ax.set_ylabel(f"{headline_metric(meta['dataset'])} (%)")
    ax.set_title(f"{meta['dataset']}: accuracy against auxiliary data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_aux_size(out: Path, results: dict, meta: dict) -> dict:
    doc = {"meta": meta, "results": results}
    (out / "aux_size.json").write_text(json.dumps(doc) + "\n")
    (out / "aux_size.md").write_text(aux_size_table(results, meta))
    plot_aux_size(results, meta, out / "aux_size.png")
    return doc
