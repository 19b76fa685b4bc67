"""Peak memory of a simulation with 10, 50 and 100 clients (10 sampled per round), side by side.

Peak RSS is the whole process tree (this process, Ray, its actors), sampled every 0.2 s. It
must not grow linearly with the number of clients: clients are Ray actor calls, not processes,
and each actor caches one model however many clients it serves.

    python benchmarks/many_clients.py [--clients 10,50,100] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(n: int, overrides: list[str], out: str) -> dict:
    cmd = [sys.executable, "-m", "fedcollm.cli", "run", "--preset", "smoke", "--out", f"{out}-{n}",
           "--set", f"data.num_clients={n}", "--set", f"federation.fraction_fit={10 / n}",
           "--set", "federation.rounds=2", "--set", "data.max_train_examples=0", "--set", "run.progress=false"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak, stop = psutil.Process(proc.pid), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{n} clients failed:\n{err[-2000:]}")
    summary = json.load(open(f"{out}-{n}/summary.json"))
    return {"clients": n, "sampled_per_round": 10, "peak_rss_mb": peak[0] / 2**20,
            "wall_s": time.perf_counter() - t0, "rounds": summary["rounds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="10,50,100")
    ap.add_argument("--out", default="runs/bench-many")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    rows = [run_one(int(n), args.overrides, args.out) for n in args.clients.split(",")]
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["rss_vs_first"] = r["peak_rss_mb"] / base
    print(json.dumps({"machine": f"{platform.machine()} cpus={os.cpu_count()}", "runs": rows}, indent=2))
    for r in rows:
        print(f"{r['clients']:>4} clients: peak RSS {r['peak_rss_mb']:.0f} MB ({r['rss_vs_first']:.2f}x of "
              f"{rows[0]['clients']}), {r['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
