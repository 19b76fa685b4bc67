"""Throughput of the hot paths on each device, side by side in one run: evaluator (items/s,
tokens/s), client SFT and server KD (tokens/s), peak memory and, on a GPU, how busy it was.

The default SmolLM2 pair (LLM SmolLM2-135M-Instruct, SLM its 20-layer copy) on ARC-Easy, in the
dtype `auto` picks (bf16 on CUDA, fp32 on CPU). Each device runs in its own process. With --rounds N it
also times a `fedcollm run` of N rounds on the whole ARC-Easy training split on CUDA (4 clients +
server KD per round, the clients on the GPU) against the issue's goals.

    python benchmarks/gpu_throughput.py [--devices cuda,cpu] [--eval-items N] [--train-examples N]
                                        [--rounds N] [--out results/bench/gpu_throughput.json]
    python benchmarks/gpu_throughput.py --show results/bench/gpu_throughput.json

Goals (one H100): both models on the full ARC-Easy test split ≤ 20 s; one round on the full
training split ≤ 60 s with the GPU busy ≥ 50% of it. CPU sizes default to a slice: the rates
are comparable, the totals are not.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

GOALS = {"eval_full_test_s": 20.0, "round_s": 60.0, "round_gpu_busy": 0.5}


class GpuBusy:
    """Samples nvidia-smi's utilisation.gpu and memory.used (the whole GPU's, every process's)
    every 0.2 s while in the `with` block."""

    def __init__(self):
        self.samples: list[float] = []
        self.memory_mb: list[float] = []
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.splitlines()[0].split(",")
                self.samples.append(float(out[0]) / 100)
                self.memory_mb.append(float(out[1]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None

    @property
    def peak_mb(self) -> float | None:
        return max(self.memory_mb) if self.memory_mb else None


def _sync(device):
    import torch  # noqa: PLC0415

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device_name: str, eval_items: int, train_examples: int, sets: list[str]) -> dict:
    """One device: the evaluator on both models, SFT of the SLM, mutual KD, in this process."""
    import dataclasses  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from fedcollm import components  # noqa: PLC0415
    from fedcollm.config import load_config  # noqa: PLC0415
    from fedcollm.eval import scoring  # noqa: PLC0415
    from fedcollm.train.distill import AuxSet, mutual_distill  # noqa: PLC0415
    from fedcollm.train.sft import sft  # noqa: PLC0415

    cfg = load_config(overrides=[f'model.device="{device_name}"', "data.max_train_examples=0",
                                 f"data.eval_examples={eval_items}", "run.progress=false", *sets])
    device = components.device_of(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    data = components.server_data(cfg)
    llm, slm = components.build_llm(cfg), components.build_slm(cfg)
    res: dict = {"device": str(device), "dtype": str(components.dtype_of(cfg)), "torch_threads": torch.get_num_threads(),
                 "batch_size": {"client": cfg.client.batch_size, "distill": cfg.distill.batch_size}, "sets": sets}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)

    eval_tokens = sum(len(r.context) + sum(len(c) for c in r.choices) for r in data.eval_requests["llm"])
    with GpuBusy() as busy:
        t0 = time.perf_counter()
        acc = {name: scoring.score(model, components.tokenizer(cfg, name), data.evals, data.eval_requests[name],
                                   batch_size=cfg.run.eval_batch_size, device=device)["acc"]
               for name, model in (("slm", slm), ("llm", llm))}
        _sync(device)
        secs = time.perf_counter() - t0
    res["eval"] = {"items": len(data.evals), "models": 2, "s": secs, "items_per_s": 2 * len(data.evals) / secs,
                   "tokens_per_s": 2 * eval_tokens / secs, "gpu_busy": busy.mean, "zero_shot_acc": acc}

    examples = [e for k in range(cfg.data.num_clients) for e in components.client_examples(cfg, k)][:train_examples]
    train_tokens = sum(len(e.ids) for e in examples)
    with GpuBusy() as busy:
        t0 = time.perf_counter()
        stats = sft(slm, examples, epochs=1, lr=cfg.client.lr, batch_size=cfg.client.batch_size,
                    pad_id=components.pad_id(cfg, "slm"), seed=0, device=device)
        _sync(device)
        secs = time.perf_counter() - t0
    res["sft"] = {"examples": len(examples), "steps": stats["steps"], "s": secs, "tokens_per_s": train_tokens / secs,
                  "gpu_busy": busy.mean}

    kd_cfg = dataclasses.replace(cfg.distill, epochs=1)
    with GpuBusy() as busy:
        t0 = time.perf_counter()
        stats = mutual_distill(llm, slm, AuxSet.shared(examples, components.pad_id(cfg)), kd_cfg, seed=0, device=device)
        _sync(device)
        secs = time.perf_counter() - t0
    res["kd"] = {"examples": len(examples), "steps": stats["steps"], "s": secs, "tokens_per_s": train_tokens / secs,
                 "gpu_busy": busy.mean}
    if device.type == "cuda":
        res["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def full_run(out: Path, rounds: int, device: str, extra: list[str]) -> dict:
    """`fedcollm run` on `device`: `rounds` rounds on the whole ARC-Easy training split (unless
    `extra` overrides say otherwise), the whole test split scored after the last; per round the
    server's own clock (clients, KD, scoring)."""
    run_dir = out.parent / "gpu_run"
    cmd = [sys.executable, "-m", "fedcollm.cli", "run", "--out", str(run_dir), "--set", "data.max_train_examples=0",
           "--set", "data.eval_examples=0", "--set", f"federation.rounds={rounds}", "--set", "run.eval_every=0",
           "--set", "run.progress=false", "--set", f'model.device="{device}"']
    cmd += [a for kv in extra for a in ("--set", kv)]
    command = "fedcollm " + " ".join(cmd[3:])
    with GpuBusy() as busy:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"the run failed: {proc.stderr[-3000:]}", flush=True)
        return {"command": command, "wall_s": wall, "failed": proc.stderr[-3000:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    per_round = [{k: r.get(k) for k in ("round", "round_s", "fit_s", "kd_s", "eval_s", "client_devices")}
                 for r in rows if r["round"] > 0]
    return {"command": command, "wall_s": wall, "rounds": per_round,
            "server_device": summary.get("server_device"), "gpu_busy_whole_run": busy.mean,
            "slm": summary["slm"], "llm": summary["llm"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cuda,cpu")
    p.add_argument("--eval-items", type=int, default=0, help="0: the whole test split on CUDA, 100 on CPU")
    p.add_argument("--train-examples", type=int, default=0, help="0: the whole training split on CUDA, 64 on CPU")
    p.add_argument("--rounds", type=int, default=0, help="also time a `fedcollm run` of this many rounds on CUDA")
    p.add_argument("--out", default="results/bench/gpu_throughput.json")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every part (repeatable), e.g. client.batch_size=32")
    p.add_argument("--run-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the --rounds run (repeatable)")
    p.add_argument("--show", metavar="JSON", help="print the table of a saved report and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.show:
        _print(json.loads(Path(args.show).read_text()))
        return
    if args.child:
        cuda = args.child.startswith("cuda")
        print(json.dumps(measure(args.child, args.eval_items or (0 if cuda else 100),
                                 args.train_examples or (10**9 if cuda else 64), args.sets)))
        return
    report: dict = {"machine": platform.platform(), "python": sys.version.split()[0], "results": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for dev in args.devices.split(","):  # the report is rewritten after each part: a cut-off run keeps the rest
        proc = subprocess.run([sys.executable, __file__, "--child", dev, "--eval-items", str(args.eval_items),
                               "--train-examples", str(args.train_examples),
                               *(a for kv in args.sets for a in ("--set", kv))], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{dev}: failed: {proc.stderr.strip()[-3000:] or proc.returncode}", flush=True)
            continue
        report["results"][dev] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{dev}: {json.dumps(report['results'][dev])}", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        if args.rounds and (dev.startswith("cuda") or args.run_set):  # on a CPU only at a size you set
            report["run"] = full_run(out, args.rounds, dev, args.sets + args.run_set)
            out.write_text(json.dumps(report, indent=2) + "\n")
    _print(report)


def _print(report: dict) -> None:
    res = report["results"]
    devs = list(res)
    rows = [("evaluator items/s (2 models)", "eval", "items_per_s"), ("evaluator tokens/s", "eval", "tokens_per_s"),
            ("client SFT tokens/s", "sft", "tokens_per_s"), ("server KD tokens/s", "kd", "tokens_per_s"),
            ("GPU busy, evaluator", "eval", "gpu_busy"), ("GPU busy, SFT", "sft", "gpu_busy"),
            ("GPU busy, KD", "kd", "gpu_busy")]
    print("| figure | " + " | ".join(f"{d} ({res[d]['dtype']})" for d in devs) + (" | ratio |" if len(devs) == 2 else " |"))
    print("|---" * (len(devs) + 1 + (len(devs) == 2)) + "|")
    for label, part, key in rows:
        vals = [res[d][part].get(key) for d in devs]
        cells = ["–" if v is None else f"{v:,.1f}" if "busy" not in label else f"{100 * v:.0f}%" for v in vals]
        ratio = ""
        if len(devs) == 2:
            ratio = f" {vals[0] / vals[1]:.1f}× |" if None not in vals and "busy" not in label else " – |"
        print(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    for d in devs:
        r = res[d]
        mem = f"peak GPU memory {r['peak_gpu_memory_mb']:,.0f} MB, " if "peak_gpu_memory_mb" in r else ""
        full = f"; full test split (2,376 items) at this rate: {2 * 2376 / r['eval']['items_per_s']:.0f} s" \
            f" (goal ≤ {GOALS['eval_full_test_s']:.0f} s on an H100)"
        print(f"{d}: {mem}peak RSS {r['peak_rss_mb']:,.0f} MB; eval {r['eval']['items']} items in {r['eval']['s']:.1f} s{full}")
    if "run" in report:
        r = report["run"]
        if "failed" in r:
            print(f"the {r['command']} failed after {r['wall_s']:.0f} s")
            return
        for row in r["rounds"]:
            print(f"round {row['round']}: {row['round_s']:.0f} s on the server's clock "
                  f"(clients {row['fit_s']:.0f} s, KD {row['kd_s']:.0f} s, scoring {row['eval_s'] or 0:.0f} s; goal "
                  f"≤ {GOALS['round_s']:.0f} s), clients on {row['client_devices']}")
        busy = "–" if r["gpu_busy_whole_run"] is None else f"{100 * r['gpu_busy_whole_run']:.0f}%"
        print(f"whole run: {r['wall_s']:.0f} s wall incl. start-up, GPU busy {busy} "
              f"(goal ≥ {100 * GOALS['round_gpu_busy']:.0f}% of a round); final SLM acc {r['slm']['acc']:.3f}, "
              f"LLM acc {r['llm']['acc']:.3f}")

if __name__ == "__main__":
    main()
