"""`fedcollm experiment`: every method × dataset × seed on the same splits, cached and resumable.

Each result is written, atomically, to
`cache/<dataset>/<method>/seed<S>-<config digest>-<code version>.json` as soon as it is computed:
the config digest is that of the experiment's config for that dataset and seed (each method's own
changes to it are fixed by its name), the code version that of the package's source
(fedcollm.version). A rerun skips what is done; a changed config or changed code computes anew
beside the old results.

One table, one code version: computing, a result of other code is recomputed; reporting only
(`--report-only`), results of several code versions are refused. `--allow-mixed-versions` uses
what the cache has, whatever code made it, and the table then says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.experiment.methods import METHODS, SEED_INDEPENDENT
from fedcollm.experiment.tables import write_aux_size, write_tables
from fedcollm.version import code_version


def cfg_for(base: Config, dataset: str, seed: int) -> Config:
    return dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=dataset),
                               run=dataclasses.replace(base.run, seed=seed))


def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
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


def version_of(doc: dict) -> str:
    """A cached result's code version (results cached before versions existed: their commit)."""
    return doc.get("code_version") or f"git:{doc.get('git_commit', 'unknown')[:12]}"


def _cached(folder: Path, seed_key: str, digest: str) -> list[dict]:
    """Every cached result of one job, newest first, whatever code made it."""
    paths = sorted(folder.glob(f"seed{seed_key}-{digest}*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [json.loads(p.read_text()) for p in paths]


@dataclasses.dataclass
class Cache:
    """The experiment's result cache and its rule: one table, one code version."""
    out: Path
    compute: bool
    allow_mixed: bool
    code: str = ""  # this process's code version, fixed at start whatever is edited later
    versions: Counter = dataclasses.field(default_factory=Counter)  # code version → results used

    def __post_init__(self):
        self.code = self.code or code_version()

    def get(self, cfg: Config, method: str, seed_key: str, tag: str) -> dict | None:
        """The job's result: from the cache, or computed now (and cached), or None (report only)."""
        dataset = cfg.data.dataset
        folder = self.out / "cache" / dataset / method
        cached = _cached(folder, seed_key, cfg.digest())
        usable = cached if (self.allow_mixed or not self.compute) else [c for c in cached if version_of(c) == self.code]
        if usable:
            self.versions[version_of(usable[0])] += 1
            print(f"{tag}: cached (code {version_of(usable[0])})", flush=True)
            return usable[0]["result"]
        if not self.compute:
            print(f"{tag}: not computed yet (left out of the tables)", flush=True)
            return None
        print(f"{tag}: running" + (" (cached results are of other code)" if cached else ""), flush=True)
        t0 = time.time()
        workdir = self.out / "runs" / dataset / method / f"seed{seed_key}-{cfg.digest()}"
        result = METHODS[method](cfg, workdir)
        if result.pop("code_version", self.code) != self.code:
            raise FedCoLLMError("experiment: the code changed while it ran (a child run reports another code "
                                "version); restart it so that one table holds one code version")
        result["seconds"] = time.time() - t0
        _write_atomic(folder / f"seed{seed_key}-{cfg.digest()}-{self.code}.json",
                      {"dataset": dataset, "method": method, "seed": seed_key, "config_digest": cfg.digest(),
                       "code_version": self.code, "git_commit": git_commit(), "result": result})
        self.versions[self.code] += 1
        print(f"{tag}: done in {result['seconds']:.0f} s: SLM {_acc(result['slm'])} LLM {_acc(result['llm'])}",
              flush=True)
        return result

    def check_one_version(self) -> None:
        if len(self.versions) > 1 and not self.allow_mixed:
            listed = ", ".join(f"{v} ({n} results)" for v, n in self.versions.most_common())
            raise FedCoLLMError(
                f"experiment: the cached results come from {len(self.versions)} code versions ({listed}); "
                "rerun without --report-only to recompute them with this code, or pass "
                "--allow-mixed-versions to tabulate them as they are (the table will say so)")

    def meta(self, command: str, base: Config, **extra) -> dict:
        return {"command": command, "code_version": self.code, "git_commit": git_commit(),
                "result_versions": dict(self.versions.most_common()), "mixed_versions_allowed": self.allow_mixed,
                "config": base.to_dict(), **extra}


def _check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FedCoLLMError(f"experiment: unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")


def run_experiment(base: Config, datasets: list[str], seeds: list[int], methods: list[str], out: Path,
                   command: str, compute: bool = True, allow_mixed: bool = False) -> dict:
    """Run (or, compute=False, only collect from the cache) every job, then write the tables."""
    _check_methods(methods)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out, compute, allow_mixed)
    # Seed by seed: an interrupted experiment leaves whole seeds (every method) rather than whole
    # methods (every seed), and the first seed's table is there early.
    jobs = [(d, m, s) for d in datasets for s in seeds for m in methods
            if m not in SEED_INDEPENDENT or s == seeds[0]]
    results: dict = {d: {m: {} for m in methods} for d in datasets}
    t_all = time.time()
    for i, (dataset, method, seed) in enumerate(jobs, 1):
        seed_key = "all" if method in SEED_INDEPENDENT else str(seed)
        tag = f"[experiment] ({i}/{len(jobs)}) {dataset} {method} seed {seed_key}"
        result = cache.get(cfg_for(base, dataset, seed), method, seed_key, tag)
        if result is not None:
            results[dataset][method][seed_key] = result
    cache.check_one_version()
    meta = cache.meta(command, base, seeds=seeds, datasets=datasets, methods=methods,
                      wall_s_this_invocation=time.time() - t_all)
    return write_tables(out, results, meta)


def run_aux_sizes(base: Config, dataset: str, fractions: list[float], seeds: list[int], methods: list[str],
                  out: Path, command: str, compute: bool = True, allow_mixed: bool = False) -> dict:
    """The paper's open question: accuracy against the auxiliary part's share of the training
    split. Writes aux_size.md, aux_size.json and aux_size.png."""
    _check_methods(methods)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out, compute, allow_mixed)
    results: dict = {str(f): {m: {} for m in methods} for f in fractions}
    jobs = [(f, s, m) for s in seeds for f in fractions for m in methods]
    for i, (fraction, seed, method) in enumerate(jobs, 1):
        cfg = cfg_for(base, dataset, seed)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, aux_fraction=fraction))
        tag = f"[aux size] ({i}/{len(jobs)}) {dataset} aux {fraction:g} {method} seed {seed}"
        result = cache.get(cfg, method, str(seed), tag)
        if result is not None:
            results[str(fraction)][method][str(seed)] = result
    cache.check_one_version()
    meta = cache.meta(command, base, dataset=dataset, fractions=fractions, seeds=seeds, methods=methods)
    return write_aux_size(out, results, meta)


def _acc(scores: dict | None) -> str:
    return "–" if scores is None else f"acc {100 * scores['acc']:.1f}"
