"""Many small jobs on one GPU, with and without CUDA MPS, side by side in one run.

The table of issue #12 runs six jobs at once on one GPU. A training step of these 135M models is
bound by kernel launches (results/bench/README.md: ~4,900 launches and 54 ms of kernels in a
196 ms SFT step), so each job leaves the GPU mostly idle, and without MPS the GPU runs the kernels
of one process at a time: concurrent jobs take turns instead of sharing its SMs. With the Multi-
Process Service (`nvidia-cuda-mps-control -d`) the kernels of all processes run side by side.

Each arm starts N processes. Each builds the SLM of the experiment's config (the default pair:
the 20-layer copy of SmolLM2-135M, bf16 on CUDA), trains 2 warm-up steps on client k's examples,
waits until all N are ready, then times S more SFT steps, the client's own training code.
Throughput is N·S steps over the time from the common start to the last finish.

    python benchmarks/concurrent_jobs.py [--procs 6] [--steps 30] [--arms plain,mps] \\
        [--config configs/experiment-gpu.toml] [--out results/bench/concurrent_jobs.json]

The MPS arm starts its own daemon with its pipe and log folders in a temporary folder, which only
its own processes are pointed at, and stops it after; an arm that cannot run says why in the
report. On a CPU only the plain arm runs (a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_throughput import GpuBusy

WARMUP_STEPS = 2
READY_TIMEOUT_S = 150  # building the model (~30 s; a fresh machine converts the GGUF first)
CHILD_TIMEOUT_S = 180  # 30 steps take ~10 s: a hang, not work


def child(config: str, k: int, steps: int, sets: list[str]) -> None:
    """One job: build the SLM, warm up, say "ready", wait for "go" on stdin, time `steps` steps."""
    import torch  # noqa: PLC0415

    from fedcollm import components  # noqa: PLC0415
    from fedcollm.config import load_config  # noqa: PLC0415
    from fedcollm.train.sft import sft  # noqa: PLC0415

    cfg = load_config(config, ["data.dataset=\"arc_easy\"", "run.progress=false", *sets])
    device = components.device_of(cfg)
    slm = components.build_slm(cfg)
    batch, need = cfg.client.batch_size, (WARMUP_STEPS + steps) * cfg.client.batch_size
    examples = components.client_examples(cfg, k % cfg.data.num_clients)
    examples = (examples * -(-need // len(examples)))[:need]  # a client's part, again if it is short

    def train(part):
        stats = sft(slm, part, epochs=1, lr=cfg.client.lr, batch_size=batch, pad_id=components.pad_id(cfg, "slm"),
                    seed=k, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return stats

    train(examples[:WARMUP_STEPS * batch])
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    stats = train(examples[WARMUP_STEPS * batch:])
    end = time.time()
    mem = torch.cuda.max_memory_reserved() / 2**20 if device.type == "cuda" else None
    print(json.dumps({"start": start, "end": end, "steps": stats["steps"], "loss": stats["loss"],
                      "device": str(device), "max_reserved_mb": mem}), flush=True)


def start_mps(folder: Path) -> dict[str, str]:
    """Start an MPS daemon whose pipe and logs are in `folder`: the environment its clients need."""
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise RuntimeError("nvidia-cuda-mps-control is not on PATH")
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"nvidia-cuda-mps-control -d: rc {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return env


def stop_mps(env: dict[str, str]) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env={**os.environ, **env}, capture_output=True,
                   text=True, timeout=60)


def last_lines(stderr: str, n: int = 8) -> str:
    """The end of a job's stderr without its progress bars: where the traceback's last lines are."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
             and "s/it]" not in ln]
    return "\n".join(lines[-n:])


def wait_ready(p: subprocess.Popen, deadline: float) -> None:
    """Read a job's stdout up to its "ready" line; the library's own lines before it (a first run
    says that it converts the GGUF: session 23's failed measure) are not failures. Read from the
    pipe itself: select() cannot see lines already in a file object's buffer."""
    fd, seen = p.stdout.fileno(), b""
    while b"ready" not in [line.strip() for line in seen.split(b"\n")[:-1]]:  # whole lines only
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError("a job was not ready in time (CUDA or MPS start hung?)")
        data = os.read(fd, 65536)
        if not data:  # end of its output: the job ended
            raise RuntimeError(f"a job failed before its first step: {last_lines(p.communicate(timeout=60)[1])}")
        seen += data


def run_arm(args, env_extra: dict[str, str]) -> dict:
    """N child processes started together; their steps over the common wall time."""
    cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
           *(a for kv in args.sets for a in ("--set", kv))]
    env = {**os.environ, **env_extra}
    procs = [subprocess.Popen([*cmd, "--child", str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for k in range(args.procs)]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for p in procs:  # every job built and warmed up before the clock starts
            wait_ready(p, deadline)
        with GpuBusy() as busy:
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [p.communicate(timeout=CHILD_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [last_lines(err) for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(procs)} jobs failed: {failed[0]}")
    jobs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    wall = max(j["end"] for j in jobs) - min(j["start"] for j in jobs)
    steps = sum(j["steps"] for j in jobs)
    return {"procs": args.procs, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "job_s": [j["end"] - j["start"] for j in jobs], "gpu_busy": busy.mean, "gpu_peak_mb": busy.peak_mb,
            "max_reserved_mb_per_job": max((j["max_reserved_mb"] or 0) for j in jobs) or None,
            "device": jobs[0]["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=6, help="jobs at once (the table's gpu_session.sh JOBS)")
    p.add_argument("--steps", type=int, default=30, help="timed SFT steps per job")
    p.add_argument("--arms", default="plain,mps")
    p.add_argument("--config", default="configs/experiment-gpu.toml")
    p.add_argument("--out", default="results/bench/concurrent_jobs.json")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.config, args.child, args.steps, args.sets)
        return
    report: dict = {"machine": platform.platform(), "python": sys.version.split()[0], "procs": args.procs,
                    "steps_per_job": args.steps, "config": args.config, "sets": args.sets, "arms": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for arm in args.arms.split(","):
        t0 = time.perf_counter()
        try:
            if arm == "plain":
                res = run_arm(args, {})
            elif arm == "mps":
                with tempfile.TemporaryDirectory(prefix="mps-") as folder:
                    env = start_mps(Path(folder))
                    try:
                        res = run_arm(args, env)
                    finally:
                        stop_mps(env)
            else:
                raise SystemExit(f"--arms: unknown arm {arm!r} (plain, mps)")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            res = {"failed": str(e)}
        res["arm_s"] = time.perf_counter() - t0  # start-up included: what the arm cost
        report["arms"][arm] = res
        print(f"{arm}: {json.dumps(res)}", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each arm: a cut-off run keeps the rest
    arms = report["arms"]
    if all("steps_per_s" in arms.get(a, {}) for a in ("plain", "mps")):
        report["mps_speedup"] = arms["mps"]["steps_per_s"] / arms["plain"]["steps_per_s"]
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def table(report: dict) -> str:
    rows = ["| arm | jobs | steps/s (all jobs) | wall s | GPU busy | GPU memory peak |", "|---|---|---|---|---|---|"]
    for arm, r in report["arms"].items():
        if "failed" in r:
            rows.append(f"| {arm} | {report['procs']} | failed: {r['failed'][:120]} | | | |")
            continue
        busy = f"{r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else "–"
        peak = f"{r['gpu_peak_mb']:,.0f} MB" if r["gpu_peak_mb"] is not None else "–"
        rows.append(f"| {arm} | {r['procs']} | {r['steps_per_s']:.2f} | {r['wall_s']:.1f} | {busy} | {peak} |")
    if "mps_speedup" in report:
        rows.append(f"\nMPS / plain throughput: {report['mps_speedup']:.2f}×")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
