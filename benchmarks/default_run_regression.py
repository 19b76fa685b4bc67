"""The README's default run, this checkout against an older commit, side by side (#11.3: the CPU
default run must stay within 1.1× of the code the GPU work started from, d27416f).

    python benchmarks/default_run_regression.py --against d27416f [--out runs/regression] [--set k=v ...]

Each run is the README's `fedcollm run` (progress bars off, its own output folder), one after the
other on this machine; the older one imports its package from a git worktree of --against
(`PYTHONPATH`, which comes before the installed checkout). Prints both wall times, their ratio
and both runs' accuracies; writes the same as JSON.
Run it on a quiet machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(out: Path, pythonpath: str | None, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    sets = [x for kv in ["run.progress=false", *overrides] for x in ("--set", kv)]
    cmd = [sys.executable, "-m", "fedcollm.cli", "run", *sets, "--out", str(out)]
    t0 = time.time()
    with open(out.with_suffix(".log"), "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if code != 0:
        sys.exit(f"default_run_regression: `{' '.join(cmd)}` failed with exit code {code}; see {out}.log")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "slm": summary["slm"]["acc"],
            "llm": summary["llm"]["acc"], "bytes_up_per_client_round": summary["comm"]["bytes_up_per_client_round"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="d27416f", help="the older commit (default: d27416f)")
    p.add_argument("--out", default="runs/regression", help="folder for both runs and regression.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for both runs (e.g. a quick check: federation.rounds=1)")
    args = p.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "older"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            older = timed_run(out / "older", str(tree / "src"), args.overrides)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    now = timed_run(out / "now", None, args.overrides)
    ratio = now["wall_s"] / older["wall_s"]
    doc = {"against": args.against, "overrides": args.overrides, "older": older, "now": now, "wall_ratio": ratio,
           "same_accuracy": (older["slm"], older["llm"]) == (now["slm"], now["llm"])}
    (out / "regression.json").write_text(json.dumps(doc, indent=2))
    print(f"default run: now {now['wall_s']:.0f} s, {args.against} {older['wall_s']:.0f} s: {ratio:.2f}× "
          f"(goal ≤ 1.1×); accuracy SLM/LLM now {now['slm']:.3f}/{now['llm']:.3f}, "
          f"then {older['slm']:.3f}/{older['llm']:.3f}")


if __name__ == "__main__":
    main()
