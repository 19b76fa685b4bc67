"""`fedcollm experiment`: every method × dataset × seed on the same splits, cached and resumable.

Each result is written, atomically, to `cache/<dataset>/<method>/seed<S>-<digest>.json` as soon
as it is computed; the digest is that of the experiment's config for that dataset and seed (each
method's own changes to it are fixed by its name), so a rerun skips what is done and a changed
config computes anew without overwriting what an older one produced. Federated
runs keep their own output folder under `runs/` and resume from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.experiment.methods import METHODS, SEED_INDEPENDENT
from fedcollm.experiment.tables import write_tables


def cfg_for(base: Config, dataset: str, seed: int) -> Config:
    return dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=dataset),
                               run=dataclasses.replace(base.run, seed=seed))


def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def git_commit() -> str:
    """The commit the code ran from (+ "-dirty" with uncommitted changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def run_experiment(base: Config, datasets: list[str], seeds: list[int], methods: list[str], out: Path,
                   command: str, compute: bool = True) -> dict:
    """Run (or, compute=False, only collect from the cache) every job, then write the tables."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FedCoLLMError(f"experiment: unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    out.mkdir(parents=True, exist_ok=True)
    # Seed by seed: an interrupted experiment leaves whole seeds (every method) rather than whole
    # methods (every seed), and the first seed's table is there early.
    jobs = [(d, m, s) for d in datasets for s in seeds for m in methods
            if m not in SEED_INDEPENDENT or s == seeds[0]]
    results: dict = {d: {m: {} for m in methods} for d in datasets}
    commits: set[str] = set()  # the code each result in the tables was computed with
    code = git_commit()  # this process's code: what it imported now, whatever is edited later
    t_all = time.time()
    for i, (dataset, method, seed) in enumerate(jobs, 1):
        cfg = cfg_for(base, dataset, seed)
        seed_key = "all" if method in SEED_INDEPENDENT else str(seed)
        path = out / "cache" / dataset / method / f"seed{seed_key}-{cfg.digest()}.json"
        tag = f"[experiment] ({i}/{len(jobs)}) {dataset} {method} seed {seed_key}"
        if path.is_file():
            cached = json.loads(path.read_text())
            results[dataset][method][seed_key] = cached["result"]
            commits.add(cached["git_commit"])
            print(f"{tag}: cached ({path})", flush=True)
            continue
        if not compute:
            print(f"{tag}: not computed yet (left out of the tables)", flush=True)
            continue
        print(f"{tag}: running", flush=True)
        t0 = time.time()
        workdir = out / "runs" / dataset / method / f"seed{seed_key}"
        result = METHODS[method](cfg, workdir)
        result["seconds"] = time.time() - t0
        _write_atomic(path, {"dataset": dataset, "method": method, "seed": seed_key,
                             "config_digest": cfg.digest(), "git_commit": code, "result": result})
        results[dataset][method][seed_key] = result
        commits.add(code)
        print(f"{tag}: done in {result['seconds']:.0f} s: SLM {_acc(result['slm'])} LLM {_acc(result['llm'])}",
              flush=True)
    meta = {"command": command, "git_commit": code, "result_commits": sorted(commits), "seeds": seeds, "datasets": datasets,
            "methods": methods, "config": base.to_dict(), "wall_s_this_invocation": time.time() - t_all}
    return write_tables(out, results, meta)


def _acc(scores: dict | None) -> str:
    return "–" if scores is None else f"acc {100 * scores['acc']:.1f}"
