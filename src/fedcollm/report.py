"""Run outputs: metrics.jsonl (a line per round), summary.json, report.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.1f}"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _bytes(x) -> str:
    return "–" if x is None else f"{x:,.0f}"


class Recorder:
    """Appends one JSON object per round to metrics.jsonl, as soon as the round is scored."""

    def __init__(self, out_dir: Path, echo: bool = True, rows: list[dict] = ()):
        """rows: rounds already scored (a resumed run); metrics.jsonl is rewritten to hold them."""
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = list(rows)  # scored rounds
        self.failed: list[dict] = []  # rounds that produced no aggregate
        self.echo = echo
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def _append(self, row: dict) -> None:
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def add_failed_round(self, row: dict) -> None:
        self.failed.append(row)
        self._append(row)
        print(f"[fedcollm] round {row['round']} FAILED: {row['failed']}; keeping the previous "
              "global adapter and stopping", flush=True)

    def add_round(self, row: dict) -> None:
        self.rows.append(row)
        self._append(row)
        if self.echo:
            print(f"[fedcollm] round {row['round']}: SLM acc {_fmt(row['slm']['acc'], True)} "
                  f"acc_norm {_fmt(row['slm']['acc_norm'], True)} | LLM acc {_fmt(row['llm']['acc'], True)} "
                  f"acc_norm {_fmt(row['llm']['acc_norm'], True)}", flush=True)


def build_summary(rows: list[dict], comm: dict, extra: dict) -> dict:
    last = rows[-1]
    fit_rows = [r for r in rows if "bytes_up_per_client" in r]
    up = max((r["bytes_up_per_client"] for r in fit_rows), default=0.0)
    down = max((r["bytes_down_per_client"] for r in fit_rows), default=0.0)
    comm = dict(comm)
    comm.update({"bytes_up_per_client_round": up, "bytes_down_per_client_round": down,
                 "ratio": up / comm["full_slm_fp32_bytes"]})
    return {"rounds": last["round"], "slm": {k: last["slm"][k] for k in ("acc", "acc_norm")},
            "llm": {k: last["llm"][k] for k in ("acc", "acc_norm")}, "comm": comm,
            "eval_examples": last["slm"]["n"], **extra}


def report_markdown(summary: dict, rows: list[dict], command: str) -> str:
    c = summary["comm"]
    lines = [
        f"# FedCoLLM run: {summary['dataset']}", "",
        f"Command: `{command}`", "",
        f"Evaluation: {summary['eval_examples']} {summary['dataset']} items ({summary['eval_split']} split), "
        "zero-shot multiple-choice log-likelihood as in lm-evaluation-harness; accuracies in %. "
        "Round 0 is before any training.", "",
        "| round | SLM acc | SLM acc_norm | LLM acc | LLM acc_norm | client loss | KD CE (LLM/SLM) | KD KL (LLM/SLM) | up B/client | down B/client |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {_fmt(r['slm']['acc'], True)} | {_fmt(r['slm']['acc_norm'], True)} | "
            f"{_fmt(r['llm']['acc'], True)} | {_fmt(r['llm']['acc_norm'], True)} | {_fmt(r.get('client_loss'))} | "
            f"{_fmt(r.get('kd_ce_llm'))}/{_fmt(r.get('kd_ce_slm'))} | {_fmt(r.get('kd_kl_llm'))}/{_fmt(r.get('kd_kl_slm'))} | "
            f"{_bytes(r.get('bytes_up_per_client'))} | {_bytes(r.get('bytes_down_per_client'))} |")
    lines += [
        "", "## Communication", "",
        f"- adapter parameters: {c['adapter_params']:,} (SLM without adapter: {c['full_slm_params']:,})",
        f"- bytes up per client per round: {c['bytes_up_per_client_round']:,.0f}; down: {c['bytes_down_per_client_round']:,.0f}"
        " (payload of the Flower messages)",
        f"- full SLM in fp32: {c['full_slm_fp32_bytes']:,} bytes; ratio up/full = {100 * c['ratio']:.3f}%",
        f"- secure aggregation: {_secure_line(summary['secure_aggregation'])}",
        "", f"Models: LLM `{summary['llm_model']}`, SLM `{summary['slm_model']}`; "
        f"{summary['num_clients']} clients; wall time {summary['wall_s']:.0f} s.",
    ]
    if summary.get("stopped"):
        lines += ["", f"**Stopped early:** {summary['stopped']} (adapters are from the last good round)."]
    return "\n".join(lines) + "\n"


def _secure_line(secure) -> str:
    if not secure:
        return "off (plain FedAvg; the server sees each client's adapter)"
    return (f"on, {secure['protocol']}: clipping ±{secure['clipping_range']}, "
            f"{secure['quantization_range']} levels, shares {secure['num_shares']}, threshold "
            f"{secure['reconstruction_threshold']}, max_weight {secure['max_weight']}; "
            f"max abs error vs FedAvg ≤ {secure['max_abs_error_bound']:.2e}")


def plot_rounds(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("acc", "acc_norm")):
        for model, style in (("slm", "o-"), ("llm", "s--")):
            ax.plot(rounds, [100 * r[model][metric] for r in rows], style, label=model.upper())
        ax.set_xlabel("round")
        ax.set_title(metric)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, rows: list[dict], summary: dict, command: str) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(summary, rows, command))
    plot_rounds(rows, out / "accuracy.png", f"FedCoLLM on {summary['dataset']}")
