"""Run outputs: metrics.jsonl (a line per round), summary.json, report.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedcollm.data.loaders import eval_split_note
from fedcollm.eval.metrics import COMPLETION, MCQ, METRICS, metrics_of


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

    def replace_last(self, row: dict) -> None:
        self.rows[-1] = row
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*self.rows, *self.failed]))

    def add_round(self, row: dict) -> None:
        self.rows.append(row)
        self._append(row)
        if self.echo and "slm" in row:
            names = _metrics([row])
            print(f"[fedcollm] round {row['round']}: " + " | ".join(
                f"{model.upper()} " + " ".join(f"{m} {_score(row, model, m)}" for m in names)
                for model in ("slm", "llm")), flush=True)


def _metrics(rows: list[dict]) -> tuple[str, ...]:
    """The figures the rows hold: accuracies, or loss and perplexity (prompt-completion data)."""
    scored = [r[m] for r in rows for m in ("slm", "llm") if r.get(m)]
    return metrics_of(scored[0]) if scored else METRICS[MCQ]


def _score(row: dict, model: str, metric: str) -> str:
    """A row's figure (accuracies in %), or – where that model was not scored (or the server has
    no LLM)."""
    scores = row.get(model)
    return _fmt(scores[metric], metric.startswith("acc")) if scores else "–"


def _figures(scores: dict | None) -> dict | None:
    return {k: scores[k] for k in metrics_of(scores)} if scores else None


def build_summary(rows: list[dict], comm: dict, extra: dict) -> dict:
    """`slm`/`llm` are the last scored round's accuracies, or loss and perplexity on
    prompt-completion data (`llm` None when the server has none)."""
    last = [r for r in rows if "slm" in r][-1]
    fit_rows = [r for r in rows if "bytes_up_per_client" in r]
    up = max((r["bytes_up_per_client"] for r in fit_rows), default=0.0)
    down = max((r["bytes_down_per_client"] for r in fit_rows), default=0.0)
    comm = dict(comm)
    comm.update({"bytes_up_per_client_round": up, "bytes_down_per_client_round": down,
                 "up_ratio_to_fp32_slm": up / comm["full_slm_fp32_bytes"],
                 "down_ratio_to_fp32_slm": down / comm["full_slm_fp32_bytes"]})
    return {"rounds": rows[-1]["round"], "slm": _figures(last["slm"]), "llm": _figures(last["llm"]),
            "comm": comm,
            "eval_examples": last["slm"]["n"], **extra}


def report_markdown(summary: dict, rows: list[dict], command: str) -> str:
    c = summary["comm"]
    note = eval_split_note(summary["dataset"], summary["eval_split"])
    names = _metrics(rows)
    how = ("the completions' mean negative log-likelihood per token (nats) and its perplexity, lower is better"
           if names == METRICS[COMPLETION] else
           "zero-shot multiple-choice log-likelihood as in lm-evaluation-harness; accuracies in %")
    columns = [f"{model} {m}" for model in ("SLM", "LLM") for m in names]
    lines = [
        f"# FedCoLLM run: {summary['dataset']}", "",
        f"Command: `{command}`", "",
        f"Evaluation: {summary['eval_examples']} {_evaluated(summary, note)}, {how}. Round 0 is before any "
        "training.", "",
        f"| round | {' | '.join(columns)} | client loss | KD CE (LLM/SLM) | KD KL (LLM/SLM) | up B/client | down B/client |",
        "|---|" + "---|" * (len(columns) + 5),
    ]
    dp = summary.get("privacy")
    if dp:  # ε after each round, as a last column
        lines[-2] = lines[-2] + " ε |"
        lines[-1] = lines[-1] + "---|"
    for r in rows:
        lines.append(
            f"| {r['round']} | " + "".join(f"{_score(r, model, m)} | " for model in ("slm", "llm") for m in names)
            + f"{_fmt(r.get('client_loss'))} | "
            f"{_fmt(r.get('kd_ce_llm'))}/{_fmt(r.get('kd_ce_slm'))} | {_fmt(r.get('kd_kl_llm'))}/{_fmt(r.get('kd_kl_slm'))} | "
            f"{_bytes(r.get('bytes_up_per_client'))} | {_bytes(r.get('bytes_down_per_client'))} |"
            + (f" {_fmt(r.get('epsilon'))} |" if dp else ""))
    lines += [
        "", "## Communication", "",
        f"- adapter parameters: {c['adapter_params']:,} (SLM without adapter: {c['full_slm_params']:,})",
        f"- bytes up per client per round: {c['bytes_up_per_client_round']:,.0f}; down: {c['bytes_down_per_client_round']:,.0f}"
        f" (payload of the Flower messages; adapter encoding {c.get('transport', '?')}"
        + (", uplink as SecAgg+'s masked integers)" if summary["secure_aggregation"] else ")"),
        f"- full SLM in fp32: {c['full_slm_fp32_bytes']:,} bytes; per client and round, up "
        f"{100 * c['up_ratio_to_fp32_slm']:.3f}% and down {100 * c['down_ratio_to_fp32_slm']:.3f}% of it",
        f"- secure aggregation: {_secure_line(summary['secure_aggregation'])}",
        *[f"- values the clients clipped to SecAgg+'s range (of {c['adapter_params']:,} each), by round: "
          + "; ".join(f"{r['round']}: {r['secagg_clipped']:,} (largest {r.get('secagg_peak', float('nan')):.4g})"
                      for r in rows if "secagg_clipped" in r)]
        * any("secagg_clipped" in r for r in rows),
        f"- differential privacy: {_privacy_line(dp)}",
        "", f"Models: LLM `{summary['llm_model'] or 'none (no KD on the server)'}`, SLM `{summary['slm_model']}`; "
        f"{summary['num_clients']} clients; wall time {summary['wall_s']:.0f} s.",
        f"Devices: server {summary.get('server_device', '?')}; clients "
        f"{', '.join(_client_devices(rows)) or '?'} (as each client reported it).",
    ]
    timed = [r for r in rows if "round_s" in r]
    if timed:  # the server's clock: from sending the round's task to the round's row
        lines.append("Round time: " + "; ".join(
            f"{r['round']}: {r['round_s']:.0f} s (clients {r.get('fit_s', 0):.0f} s, KD {r.get('kd_s', 0):.0f} s, "
            f"scoring {r.get('eval_s', 0):.0f} s)" for r in timed) + ".")
    if summary.get("stopped"):
        lines += ["", f"**Stopped early:** {summary['stopped']} (adapters are from the last good round)."]
    return "\n".join(lines) + "\n"


def _evaluated(summary: dict, note: str) -> str:
    """What the items were: those of the evaluation file, or of the dataset's split."""
    if summary.get("eval_file") and summary["eval_split"] != "train_holdout":
        return f"items of {summary['eval_file']}"
    return f"{summary['dataset']} items ({summary['eval_split']} split{'; ' + note if note else ''})"


def _privacy_line(dp) -> str:
    if not dp:
        return "off"
    return (f"{dp['mode']}, clipping norm C = {dp['clipping_norm']:g}, noise multiplier σ = {dp['noise_multiplier']:.4g} "
            f"(std {dp['noise_std_on_mean']:.3g} on the mean of {dp['clients_per_round']} clients, sample rate "
            f"{dp['sample_rate']:g}); (ε, δ) = ({dp['epsilon']:.3g}, {dp['delta']:g}) after the last round, "
            f"client level, {dp['accountant']}")


def _client_devices(rows: list[dict]) -> list[str]:
    return sorted({d for r in rows for d in r.get("client_devices", [])})


def _secure_line(secure) -> str:
    if not secure:
        return "off (plain FedAvg; the server sees each client's adapter)"
    return (f"on, {secure['protocol']}: values in units of {secure['value_scale']:.3g}, clipping "
            f"±{secure['clipping_range']}, {secure['quantization_range']} levels, modulus 2^{secure['bits_per_value']} "
            f"(bits a value), shares {secure['num_shares']}, threshold "
            f"{secure['reconstruction_threshold']}, max_weight {secure['max_weight']}; "
            + (f"max abs error vs FedAvg ≤ {secure['max_abs_error_bound']:.2e}" if secure['max_abs_error_bound']
               else "error bound unknown (the server does not know the clients' example counts)"))


def plot_rounds(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = _metrics(rows)
    accuracy = names == METRICS[MCQ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=accuracy)
    for ax, metric in zip(axes, names):
        scale = 100 if accuracy else 1
        for model, style in (("slm", "o-"), ("llm", "s--")):
            scored = [r for r in rows if r.get(model)]
            if scored:
                ax.plot([r["round"] for r in scored], [scale * r[model][metric] for r in scored], style,
                        label=model.upper())
        rounds = [r["round"] for r in rows]
        ax.set_xlabel("round")
        ax.set_title(metric)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)" if accuracy else "completion loss (nats per token)")
    if not accuracy:
        axes[1].set_ylabel("perplexity")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, rows: list[dict], summary: dict, command: str) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(summary, rows, command))
    name = "accuracy.png" if _metrics(rows) == METRICS[MCQ] else "loss.png"
    plot_rounds(rows, out / name, f"FedCoLLM on {summary['dataset']}")
