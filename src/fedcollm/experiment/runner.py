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
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from fedcollm import checkpoint
from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.experiment.methods import METHODS, SEED_INDEPENDENT
from fedcollm.experiment.tables import write_aux_size, write_tables
from fedcollm.version import code_version


def cfg_for(base: Config, dataset: str, seed: int) -> Config:
    return dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=dataset),
                               run=dataclasses.replace(base.run, seed=seed))


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
    """Every cached result of one job, newest first, whatever code made it: by the time it
    records (a checkout gives committed files one mtime), then by mtime (older results)."""
    docs = [(json.loads(p.read_text()), p.stat().st_mtime) for p in folder.glob(f"seed{seed_key}-{digest}*.json")]
    return [d for d, _ in sorted(docs, key=lambda dm: (dm[0].get("computed_at", 0.0), dm[1]), reverse=True)]


@dataclasses.dataclass(frozen=True)
class Job:
    cfg: Config
    method: str
    seed_key: str  # "0", "1", ... or "all" (seed-independent methods)
    tag: str  # how the log names it
    key: tuple  # where its result goes in the tables


def sharing_one_gpu(cfg: Config) -> Config:
    """The config of a job that runs beside others on the GPU: with federation.client_gpus
    "auto", its simulated clients train one after another in one Ray actor instead of in one
    actor each. Each actor holds its own CUDA context, SLM and activations (~4.5 GB at batch 32,
    results/experiment-gpu/README.md): 3 concurrent jobs of 4 actors and a server each filled an
    80 GB H100, while the other jobs keep the GPU busy anyway. Where clients train is not part of
    the config's digest, so the cached results stay the same."""
    if cfg.federation.client_gpus != "auto" or not cfg.on_cuda():
        return cfg
    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, client_gpus=1.0))


def visible_gpus(cfg: Config) -> list[str]:
    """The GPUs that concurrent jobs of cfg spread over: those CUDA_VISIBLE_DEVICES names, else
    every one torch sees; none for a CPU run or a device the user named (`cuda:N`)."""
    if cfg.model.device not in ("auto", "cuda") or not cfg.on_cuda():
        return []
    import torch  # noqa: PLC0415

    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g.strip() for g in named.split(",") if g.strip()] if named else [str(i) for i in range(torch.cuda.device_count())]


class GpuPool:
    """Concurrent jobs on a host with several GPUs: each job's process is shown one of them
    (CUDA_VISIBLE_DEVICES), the one that runs the fewest jobs at that moment. Otherwise every job
    would start on GPU 0, the one "cuda" means in each process, and the others would stay idle.
    With one GPU (or none) jobs see what the experiment sees."""

    def __init__(self, gpus: list[str]):
        self.running = dict.fromkeys(gpus if len(gpus) > 1 else [], 0)
        self._lock = threading.Lock()

    @contextmanager
    def one(self):
        if not self.running:
            yield None
            return
        with self._lock:
            gpu = min(self.running, key=self.running.get)  # the first of the least busy
            self.running[gpu] += 1
        try:
            yield gpu
        finally:
            with self._lock:
                self.running[gpu] -= 1


def child_env(gpu: str | None) -> dict:
    """A job process's environment: on the GPU it was given, if any; and, on a GPU that processes
    come and go on, segments that grow and shrink, which leave less of its memory stranded
    between them (unless the user chose their own allocator settings)."""
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                                     "expandable_segments:True")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def run_in_child(cfg: Config, method: str, workdir: Path, gpu: str | None = None, tag: str = "") -> dict:
    """METHODS[method](cfg, workdir) in a fresh process (`python -m fedcollm.experiment.job`), on
    GPU `gpu` alone if given: concurrent jobs must not share a process (models, Ray, the GPU's
    caching allocator). Each line of its output (stdout and stderr) is printed after `tag | `:
    the lines of jobs that run at once interleave, and would not say which job they are from."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_file, result_file = workdir.with_suffix(".job.toml"), workdir.with_suffix(".job.json")
    config_file.write_text(sharing_one_gpu(cfg).to_toml())
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fedcollm.experiment.job", str(config_file), method, str(workdir), str(result_file)]
    with subprocess.Popen(cmd, env=child_env(gpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as child:
        for line in child.stdout:  # bytes, split at "\n" only: a bar's "\r" redraws stay in their line
            text = line.decode(errors="replace")
            sys.stdout.write(f"{tag} | {text}" + ("" if text.endswith("\n") else "\n"))
            sys.stdout.flush()
    code = child.returncode
    if code != 0 or not result_file.is_file():
        raise FedCoLLMError(f"experiment: `{shlex.join(cmd)}` failed with exit code {code} (its log is above)")
    return json.loads(result_file.read_text())


def _progress(done: int, total: int, spent: float) -> str:
    """`14 of 56 jobs to compute done, 12 min, ~36 min left`: the time left at the pace so far
    (jobs differ in size, so a first look, better as more are done)."""
    def span(seconds: float) -> str:
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"

    left = spent / max(done, 1) * (total - done)
    return f"{done} of {total} jobs to compute done, {span(spent)}" + (f", ~{span(left)} left" if done < total else "")


@dataclasses.dataclass
class Cache:
    """The experiment's result cache and its rule: one table, one code version."""
    out: Path
    compute: bool
    allow_mixed: bool
    code: str = ""  # this process's code version, fixed at start whatever is edited later
    versions: Counter = dataclasses.field(default_factory=Counter)  # code version → results used
    computed: int = 0  # jobs computed by this run so far, of `to_compute` (the log's progress)
    to_compute: int = 0
    started: float = 0.0  # when this run began computing (its pace: the time left)

    def __post_init__(self):
        self.code = self.code or code_version()
        self._lock = threading.Lock()  # concurrent jobs count their results

    def lookup(self, job: Job) -> dict | None:
        """The job's cached result that the table may use, or None."""
        cached = _cached(self._folder(job), job.seed_key, job.cfg.digest())
        usable = cached if (self.allow_mixed or not self.compute) else [c for c in cached if version_of(c) == self.code]
        if not usable:
            print(f"{job.tag}: " + (f"not computed yet (left out of the tables){self._on_gpu_hint(job)}"
                                    if not self.compute else
                                    "to run" + (" (cached results are of other code)" if cached else "")), flush=True)
            return None
        self.versions[version_of(usable[0])] += 1
        print(f"{job.tag}: cached (code {version_of(usable[0])})", flush=True)
        return usable[0]["result"]

    def compute_job(self, job: Job, in_child: bool, gpu: str | None = None) -> dict:
        """Run the job (here, or in a child process of its own, on GPU `gpu` if given), cache its
        result, return it."""
        print(f"{job.tag}: running" + (f" on GPU {gpu}" if gpu is not None else ""), flush=True)
        t0 = time.time()
        # The code version in the name: a run killed earlier resumes from its checkpoint only
        # when the same code computes it (new code once resumed an old code's finished run).
        name = f"seed{job.seed_key}-{job.cfg.digest()}-{self.code}"
        workdir = self.out / "runs" / job.cfg.data.dataset / job.method / name
        # The state a try cut short left (a round, an epoch, a finished client): this try goes on
        # from it, and its time does not count the earlier try's.
        continued = any(workdir.glob("*.pt")) or any(workdir.glob("standalone-client*.json"))
        result = run_in_child(job.cfg, job.method, workdir, gpu, job.tag) if in_child else METHODS[job.method](job.cfg, workdir)
        if result.pop("code_version", self.code) != self.code:
            raise FedCoLLMError("experiment: the code changed while it ran (a child run reports another code "
                                "version); restart it so that one table holds one code version")
        result["seconds"] = time.time() - t0
        if continued:
            result["continued"] = True
        checkpoint.write_json(self._folder(job) / f"seed{job.seed_key}-{job.cfg.digest()}-{self.code}.json",
                      {"dataset": job.cfg.data.dataset, "method": job.method, "seed": job.seed_key,
                       "config_digest": job.cfg.digest(), "code_version": self.code, "git_commit": git_commit(),
                       "computed_at": time.time(), "result": result})
        with self._lock:
            self.versions[self.code] += 1
            self.computed += 1
            progress = _progress(self.computed, self.to_compute, time.time() - self.started) if self.to_compute else ""
        print(f"{job.tag}: done in {result['seconds']:.0f} s: SLM {_acc(result['slm'])} LLM {_acc(result['llm'])}"
              + (f" ({progress})" if progress else ""), flush=True)
        return result

    def run(self, jobs: list[Job], parallel: int) -> dict:
        """Every job's result by its key: cached ones, then the missing ones computed, `parallel`
        at a time (each in its own process when more than one, spread over the GPUs when the
        host has several: GpuPool). A job that fails beside others
        is run once more, alone, after them: concurrent jobs can fail for want of GPU memory
        that one job alone has. A job that fails alone raises; finished ones stay cached."""
        results, missing = {}, []
        for job in jobs:
            found = self.lookup(job)
            if found is not None:
                results[job.key] = found
            elif self.compute:
                missing.append(job)
        self.to_compute += len(missing)
        self.started = self.started or time.time()
        if parallel <= 1:
            for job in missing:
                results[job.key] = self.compute_job(job, in_child=False)
            return results
        failed, gpus = [], GpuPool(visible_gpus(missing[0].cfg) if missing else [])

        def on_a_gpu(job: Job) -> dict:
            with gpus.one() as gpu:
                return self.compute_job(job, True, gpu)

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(on_a_gpu, job): job for job in missing}
            for future in as_completed(futures):
                try:
                    results[futures[future].key] = future.result()
                except FedCoLLMError as e:
                    print(f"{futures[future].tag}: failed beside other jobs ({e}); it runs again alone "
                          "when they are done", flush=True)
                    failed.append(futures[future])
        for job in failed:
            results[job.key] = on_a_gpu(job)
        return results

    def _on_gpu_hint(self, job: Job) -> str:
        """Where a job missing here was computed on a GPU: model.dtype "auto" is bf16 there and
        fp32 here, two configs (Config.digest), so a table computed on a GPU and reported on a
        CPU finds none of its results unless the report names the GPU's dtype."""
        if job.cfg.model.dtype != "auto" or job.cfg.on_cuda():
            return ""
        as_on_gpu = dataclasses.replace(job.cfg, model=dataclasses.replace(job.cfg.model, dtype="bfloat16"))
        if not _cached(self._folder(job), job.seed_key, as_on_gpu.digest()):
            return ""
        return ("; the cache has it as computed on a GPU, where model.dtype \"auto\" is bf16: "
                "add --set model.dtype='\"bfloat16\"' to report those results")

    def _folder(self, job: Job) -> Path:
        return self.out / "cache" / job.cfg.data.dataset / job.method

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


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FedCoLLMError(f"experiment: unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")


def run_experiment(base: Config, datasets: list[str], seeds: list[int], methods: list[str], out: Path,
                   command: str, compute: bool = True, allow_mixed: bool = False, parallel: int = 1) -> dict:
    """Run (or, compute=False, only collect from the cache) every job, `parallel` at a time, then
    write the tables."""
    check_methods(methods)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out, compute, allow_mixed)
    # Seed by seed: an interrupted experiment leaves whole seeds (every method) rather than whole
    # methods (every seed), and the first seed's table is there early.
    triples = [(d, m, s) for d in datasets for s in seeds for m in methods
               if m not in SEED_INDEPENDENT or s == seeds[0]]
    jobs = []
    for i, (dataset, method, seed) in enumerate(triples, 1):
        seed_key = "all" if method in SEED_INDEPENDENT else str(seed)
        jobs.append(Job(cfg_for(base, dataset, seed), method, seed_key,
                        f"[experiment] ({i}/{len(triples)}) {dataset} {method} seed {seed_key}",
                        (dataset, method, seed_key)))
    t_all = time.time()
    results: dict = {d: {m: {} for m in methods} for d in datasets}
    for (dataset, method, seed_key), result in cache.run(jobs, parallel).items():
        results[dataset][method][seed_key] = result
    cache.check_one_version()
    meta = cache.meta(command, base, seeds=seeds, datasets=datasets, methods=methods,
                      wall_s_this_invocation=time.time() - t_all)
    return write_tables(out, results, meta)


def run_aux_sizes(base: Config, dataset: str, fractions: list[float], seeds: list[int], methods: list[str],
                  out: Path, command: str, compute: bool = True, allow_mixed: bool = False,
                  parallel: int = 1) -> dict:
    """The paper's open question: accuracy against the auxiliary part's share of the training
    split. Writes aux_size.md, aux_size.json and aux_size.png."""
    check_methods(methods)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out, compute, allow_mixed)
    triples = [(f, s, m) for s in seeds for f in fractions for m in methods]
    jobs = []
    for i, (fraction, seed, method) in enumerate(triples, 1):
        cfg = cfg_for(base, dataset, seed)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, aux_fraction=fraction))
        jobs.append(Job(cfg, method, str(seed), f"[aux size] ({i}/{len(triples)}) {dataset} aux {fraction:g} "
                                                f"{method} seed {seed}", (str(fraction), method, str(seed))))
    results: dict = {str(f): {m: {} for m in methods} for f in fractions}
    for (fraction, method, seed_key), result in cache.run(jobs, parallel).items():
        results[fraction][method][seed_key] = result
    cache.check_one_version()
    meta = cache.meta(command, base, dataset=dataset, fractions=fractions, seeds=seeds, methods=methods)
    return write_aux_size(out, results, meta)


def _acc(scores: dict | None) -> str:
    """The headline figure of a job's line: acc in %, or loss."""
    if scores is None:
        return "–"
    return f"loss {scores['loss']:.3f}" if "loss" in scores else f"acc {100 * scores['acc']:.1f}"
