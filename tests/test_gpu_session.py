"""scripts/gpu_session.sh: what a device call sends back of the jobs it could not finish, and how
the next session puts it back. (The jobs' own continuing is tested in test_experiment.py and
test_faults.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.sh"


def run_bash(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`script` with the functions of gpu_session.sh, in `cwd`."""
    return subprocess.run(["bash", "-c", f"source {SCRIPT}; cd {cwd}; {script}"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, **env}, timeout=60)


def bash(script: str, cwd: Path, **env: str) -> str:
    done = run_bash(script, cwd, **env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def job(root: Path, study: str, name: str, files: dict[str, int], finished: bool = False, round_: int = 1) -> Path:
    """A job folder <study>/runs/<dataset>/<method>/<name> with files of the given sizes (a run's
    checkpoint.pt: a real one of that round), and its cache entry
    <study>/cache/<dataset>/<method>/<name>.json if finished."""
    folder = root / study / "runs" / name
    (folder / "adapters").mkdir(parents=True)
    for file, size in files.items():
        payload = bytes([len(file)]) * size
        if file == "checkpoint.pt":
            torch.save({"round": round_, "adapter": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                       folder / file)
        else:
            (folder / file).write_bytes(payload)
    if finished:
        (root / study / "cache" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / study / "cache" / f"{name}.json").write_text("{}")
    return folder


def test_unfinished_jobs_state_goes_back_whole_within_the_budget_and_is_restored(tmp_path):
    runs, mib = tmp_path / "runs", 1 << 20
    job(runs, "experiment-gpu", "arc_easy/fedavg/seed0-a-v", {"checkpoint.pt": 1000}, finished=True)
    job(runs, "traffic-gpu", "openbookqa/fedcollm/seed0-b-v", {"checkpoint.pt": 2 * mib, "metrics.jsonl": 10})
    job(runs, "experiment-gpu", "csqa/centralized/seed0-c-v", {"centralized.pt": 3 * mib})
    job(runs, "experiment-gpu", "csqa/standalone/seed1-d-v",
        {"standalone-client0.json": 50, "standalone-client1.pt": mib // 2})
    job(runs, "experiment-gpu", "arc_easy/kd_llm_to_slm/seed2-e-v", {"checkpoint.pt": 1000}, round_=0)
    last = job(runs, "experiment-gpu", "arc_easy/lambda0/seed2-g-v", {"checkpoint.pt": 1000}, round_=3)
    (last / "config.toml").write_text("[federation]\nrounds = 3\n")
    listed = bash("unfinished runs 3", tmp_path).split()
    # Whole jobs only, up to 3 MiB: the centralized job (3 MiB) does not fit beside the others;
    # the finished job, a run still at round 0 (its start), one past its last round (resumed, the
    # pinned code would cache it without per-item scores), and files that are not state
    # (metrics, adapters/) stay behind.
    assert sorted(listed) == ["experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client0.json",
                              "experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client1.pt",
                              "traffic-gpu/runs/openbookqa/fedcollm/seed0-b-v/checkpoint.pt"]

    # Sent in parts as `go` sends them, staged by the next session, restored under a new folder
    # that already holds a newer file of its own: that one is kept.
    parts = tmp_path / ".gpu" / "resume-20260101T000000000"
    parts.mkdir(parents=True)
    bash(f"unfinished runs 3 | tar -c -C runs -T - | split -b 1M -d -a 2 - {parts}/resume-20260101T000000000.tar.part-",
         tmp_path)
    assert len(list(parts.iterdir())) == 3
    new = tmp_path / "new"
    own = new / "experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client0.json"
    own.parent.mkdir(parents=True)
    own.write_text("newer")
    out = bash("restore new", tmp_path, RUNS=str(tmp_path / "device-tmp"))
    assert "restored 3 job files from .gpu/resume-20260101T000000000" in out
    assert own.read_text() == "newer"
    for path in ("traffic-gpu/runs/openbookqa/fedcollm/seed0-b-v/checkpoint.pt",
                 "experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client1.pt"):
        assert (new / path).read_bytes() == (runs / path).read_bytes()
    assert not parts.exists()  # restored once: a second `go` keeps the newer state it made itself


def test_go_starts_the_work_once_and_a_later_call_finds_it_running_on(tmp_path):
    """`go` detaches the work from its call (a call's end kills only its own processes): the
    second call of a session does not start it again, only waits and sends back a new snapshot.
    The steps here are a stand-in `fedcollm experiment` that caches one result once the test lets
    it go on (the file `release`: so that the first call surely ends while the work runs)."""
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (tmp_path / ".gpu" / "table" / "src" / "fedcollm").mkdir(parents=True)
    runs = tmp_path / "device-tmp"
    fake = venv / "fedcollm"
    fake.write_text(f"""#!/bin/bash
echo "$*" >> {runs}/calls
out=$(echo "$*" | sed 's/.*--out \\([^ ]*\\).*/\\1/')
for i in $(seq 150); do [ -e {runs}/release ] && break; sleep 0.2; done
mkdir -p "$out/cache/d/m" && echo '{{}}' > "$out/cache/d/m/seed0.json"; echo "a job is done"
""")
    (venv / "ray").write_text("#!/bin/bash\n")
    for exe in (fake, venv / "ray"):
        exe.chmod(0o755)
    env = {"RUNS": str(runs), "SHIP_S": "0"}
    cut_short = job(runs, "experiment-gpu", "csqa/fedavg/seed1-f-v", {"checkpoint.pt": 1000})  # an earlier call's

    first, second = tmp_path / "out1", tmp_path / "out2"
    first.mkdir(), second.mkdir()
    said = bash("go 1", tmp_path, OUT=str(first), **env)
    assert "go: started the work" in said and (first / "gpu-session.tgz").is_file()  # the table step still running
    (runs / "release").touch()
    said = bash("go 20", tmp_path, OUT=str(second), **env)
    assert "runs on" in said and "steps: all done" in said
    calls = (runs / "calls").read_text().splitlines()
    assert len(calls) == 5  # table, aux_size, 2 probes, traffic: each started once, none again by the second call
    assert "--datasets arc_easy,openbookqa,commonsense_qa,arc_challenge" in calls[0]
    assert "--aux-fractions" in calls[1] and "--traffic-grid" in calls[4]
    # The CommonsenseQA probe: the LLM alone on a fifth of the data, 1 and 5 local epochs side by
    # side, scored on items held out of the training split, never on test.
    probes = sorted(calls[2:4], key=lambda c: "local_epochs=5" in c)
    for epochs, call in zip((1, 5), probes):
        assert f"client.local_epochs={epochs}" in call and "--methods centralized" in call, call
        assert 'data.eval_split="train_holdout"' in call and "data.max_train_examples=1848" in call, call
    subprocess.run(["tar", "xzf", second / "gpu-session.tgz", "-C", tmp_path], check=True)
    shipped = tmp_path / "gpu-out"
    for path in ("experiment-gpu/cache/d/m/seed0.json", "probe-gpu/cache/d/m/seed0.json",
                 "traffic-gpu/cache/d/m/seed0.json", "steps.log", "probe-e5.log"):
        assert (shipped / path).is_file(), path
    # No MPS daemon on this machine: the work ran without, and the log says why.
    assert "steps: CUDA MPS: no nvidia-cuda-mps-control here: off" in (shipped / "steps.log").read_text()
    assert "a job is done" in (shipped / "table.log").read_text()  # each line of it timed
    assert all(line[2] == ":" and line[5] == ":" for line in (shipped / "table.log").read_text().splitlines())
    # The job an earlier session cut short is still unfinished: its state went back with the
    # first call, and the list of it; the second call does not send the same state again.
    assert (shipped / "resume.list").read_text() == "" and not list(second.glob("resume*"))
    subprocess.run(["tar", "xzf", first / "gpu-session.tgz", "-C", tmp_path], check=True)
    assert (shipped / "resume.list").read_text().split() == [str((cut_short / "checkpoint.pt").relative_to(runs))]
    assert [p.name.split(".", 1)[1] for p in first.glob("resume-*")] == ["tar.part-00"]


def test_a_sessions_calls_send_back_different_jobs_and_the_newest_state_of_each_is_restored(tmp_path):
    """One call returns ≤ 64 MiB, less than the state of all the jobs a session leaves unfinished.
    Each call sends what no earlier call of the session sent (a job's state again only once it
    has moved on); `collect` keeps the latest state of every unfinished job in one committed
    folder (an ignored one does not reach the next session's new checkout), and the next session,
    on a fresh machine, restores it."""
    runs, mib = tmp_path / "device-tmp", 1 << 20
    (runs / "logs").mkdir(parents=True)
    (runs / "logs" / "device.txt").write_text("restored 1 job files from /tmp/x/staged/resume-20250101T000000000\n")
    finished = job(runs, "experiment-gpu", "obqa/fedavg/seed0-a-v", {"checkpoint.pt": 100}, finished=True)
    job(runs, "probe-gpu", "csqa/centralized/seed0-x-v", {"centralized.pt": 100}, finished=True)
    # A set an earlier session committed: the job that finished this session, c at round 1 (which
    # moved on here), and p, which this session did not reach.
    earlier = tmp_path / "earlier"
    for name, size in (("obqa/fedavg/seed0-a-v", 100), ("obqa/fedcollm/seed1-c-v", 300), ("csqa/lambda0/seed0-p-v", 200)):
        job(earlier, "experiment-gpu", name, {"checkpoint.pt": size})
    b = job(runs, "experiment-gpu", "obqa/fedcollm/seed0-b-v", {"checkpoint.pt": 2 * mib})
    a = job(runs, "experiment-gpu", "obqa/fedcollm/seed1-c-v", {"checkpoint.pt": 2 * mib})  # written last
    outs = [tmp_path / f"out{k}" for k in range(1, 5)]
    env = {"RUNS": str(runs), "RESUME_MIB": "3"}

    def ship(out: Path) -> list[str]:
        out.mkdir()
        bash("ship", tmp_path, OUT=str(out), **env)
        subprocess.run(["tar", "xzf", out / "gpu-session.tgz", "-C", tmp_path], check=True)
        return [line.split("/")[4] for line in (tmp_path / "gpu-out" / "resume.list").read_text().split()]

    assert ship(outs[0]) == ["seed1-c-v"]  # the newest job that fits 3 MiB
    assert ship(outs[1]) == ["seed0-b-v"]  # not c again: its state has not changed
    assert ship(outs[2]) == [] and not list(outs[2].glob("resume*"))
    torch.save({"round": 2, "adapter": torch.ones(10)}, a / "checkpoint.pt")
    (runs / "logs" / "device.txt").write_text("NVIDIA H200\n")  # (a call whose log names no restore)
    assert ship(outs[3]) == ["seed1-c-v"]  # c has moved on
    assert len({p.name.split(".")[0] for out in outs for p in out.glob("resume-*")}) == 3  # a name per call

    def checkout(name: str) -> Path:
        """A checkout here with an older result of its own (kept), and the earlier set in its
        resume folder as git holds it (no pack moved it out)."""
        here = tmp_path / name
        mine = here / "results/experiment-gpu/cache/obqa/fedavg/seed0-a-v.json"
        mine.parent.mkdir(parents=True)
        mine.write_text("mine")
        committed = here / "results/experiment-gpu/resume/resume-20250101T000000000"
        committed.mkdir(parents=True)
        bash(f"tar -c -C {earlier} . | split -b 1M -d -a 2 - {committed}/resume-20250101T000000000.tar.part-", here)
        return here

    here = checkout("checkout")
    said = bash("collect " + " ".join(map(str, outs)), here, LOGS="logs-s1")
    assert (here / "results/experiment-gpu/cache/obqa/fedavg/seed0-a-v.json").read_text() == "mine"
    assert (here / "results/experiment-gpu/probe/cache/csqa/centralized/seed0-x-v.json").is_file()  # each study's own
    assert (here / "logs-s1" / "call4-device.txt").is_file()
    assert "kept 3 of 3 unfinished jobs' state" in said and "starts afresh" not in said
    kept = list((here / "results/experiment-gpu/resume").iterdir())
    assert len(kept) == 1 and kept[0].name != "resume-20250101T000000000"  # one new set, the old one gone
    assert not list(here.glob(".gpu/resume-*"))

    # The next session: pack moves the set out of the tree that travels with every call, a stage
    # call carries it, and a fresh machine restores c's state of the fourth call, b's of the
    # second, and p's of the earlier set; the finished job's state is gone.
    bash("take_resume", here)
    assert not list((here / "results/experiment-gpu/resume").iterdir()) and (here / ".gpu" / kept[0].name).is_dir()
    out = bash("restore new", here, RUNS=str(tmp_path / "fresh"))
    assert "restored 3 job files from" in out and not list((here / ".gpu").iterdir())
    for root, folder in ((runs, a), (runs, b), (earlier, earlier / "experiment-gpu/runs/csqa/lambda0/seed0-p-v")):
        path = folder.relative_to(root) / "checkpoint.pt"
        assert (here / "new" / path).read_bytes() == (root / path).read_bytes()
    assert not (here / "new" / finished.relative_to(runs)).exists()

    # Over the cap, the most recently written jobs are kept whole: c (small since round 2), then
    # not b (2 MiB), then p.
    here = checkout("checkout-capped")
    said = bash("collect " + " ".join(map(str, outs)), here, RESUME_KEEP_MIB="1")
    assert "kept 2 of 3 unfinished jobs' state" in said
    assert "over RESUME_KEEP_MIB = 1, starts afresh: experiment-gpu/runs/obqa/fedcollm/seed0-b-v" in said
    bash("take_resume", here)
    bash("restore new", here, RUNS=str(tmp_path / "fresh"))
    assert sorted(p.parent.name for p in (here / "new").rglob("checkpoint.pt")) == ["seed0-p-v", "seed1-c-v"]


def test_the_work_runs_under_mps_only_where_the_benchmark_measured_it_faster(tmp_path):
    """mps_pays reads benchmarks/concurrent_jobs.py's report: MPS only at MPS_GAIN times the
    throughput without it, never where an arm failed or nothing was measured."""
    def decide(report: dict | None) -> tuple[int, str]:
        path = tmp_path / "concurrent_jobs.json"
        path.unlink(missing_ok=True)
        if report is not None:
            path.write_text(json.dumps(report))
        done = run_bash(f"mps_pays {path}", tmp_path, MPS_GAIN="1.2")
        return done.returncode, done.stdout

    measured = {"arms": {"plain": {"steps_per_s": 10.0}, "mps": {"steps_per_s": 13.0}}}
    assert decide({**measured, "mps_speedup": 1.3}) == (0, "measured 1.30x the throughput without it (want 1.2x): ")
    assert decide({**measured, "mps_speedup": 1.15})[0] == 1
    code, said = decide({"arms": {"plain": {"steps_per_s": 10.0}, "mps": {"failed": "rc 1: no daemon"}}})
    assert code == 1 and "rc 1: no daemon" in said
    assert decide(None) == (1, "not measured (no report): ")


def test_the_mps_measure_waits_past_the_librarys_own_lines_and_reports_a_jobs_traceback(monkeypatch):
    """Session 23's measure failed on a fresh H200: each job's first stdout line was the library's
    "converting ... once" before its "ready". Lines before "ready" are not failures; a job that
    ends before it is, with its traceback's last line rather than its progress bars."""
    import pytest  # noqa: PLC0415

    monkeypatch.syspath_prepend(str(SCRIPT.parents[1] / "benchmarks"))
    import concurrent_jobs  # noqa: PLC0415

    def job(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE, text=True)

    ok = job("print('[fedcollm] converting x.gguf once'); print('ready', flush=True); input()")
    concurrent_jobs.wait_ready(ok, deadline=__import__("time").monotonic() + 30)
    ok.communicate("go\n", timeout=30)
    assert ok.returncode == 0

    bad = job("import sys; print('[fedcollm] converting'); sys.stderr.write('Loading: 5.0it/s]\\r' * 3); "
              "raise ValueError('no such split')")
    with pytest.raises(RuntimeError, match="before its first step") as failed:
        concurrent_jobs.wait_ready(bad, deadline=__import__("time").monotonic() + 30)
    assert str(failed.value).endswith("ValueError: no such split") and "it/s]" not in str(failed.value)


def test_report_writes_each_steps_tables_beside_its_cache_from_the_works_own_arguments(tmp_path):
    """`report` runs each step's `fedcollm experiment` (the same arguments as `go`) with
    --report-only and the GPU's bf16 over the committed caches: the table and the aux-size study
    beside results/experiment-gpu/cache, the probe's two runs in probe/epochs-1 and -5, and a step
    with nothing cached yet (here the traffic step) leaves no files behind."""
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = venv / "fedcollm"  # a stand-in: a result is cached unless it is the traffic step's
    fake.write_text(f"""#!/bin/bash
echo "$*" >> {calls}
out=$(echo "$*" | sed 's/.*--out \\([^ ]*\\).*/\\1/')
mkdir -p "$out/cache"
case "$*" in
  *--traffic-grid*) echo "x: not computed yet (left out of the tables)"; touch "$out/traffic.md" ;;
  *--aux-fractions*) echo "x: cached (code v)"; touch "$out/aux_size.md" ;;
  *) echo "x: cached (code v)"; touch "$out/table1.md" "$out/results.json" ;;
esac
""")
    fake.chmod(0o755)
    (tmp_path / "results" / "experiment-gpu" / "cache").mkdir(parents=True)
    (tmp_path / "results" / "experiment-gpu" / "probe" / "cache").mkdir(parents=True)
    (tmp_path / "results" / "traffic").mkdir()  # the CPU sweep's folder; traffic-gpu's gpu/ is not there yet
    said = bash("report", tmp_path)
    experiment = tmp_path / "results" / "experiment-gpu"
    assert sorted(p.name for p in experiment.iterdir()) == ["aux_size.md", "cache", "probe", "results.json", "table1.md"]
    for epochs in (1, 5):
        assert sorted(p.name for p in (experiment / "probe" / f"epochs-{epochs}").iterdir()) == ["results.json", "table1.md"]
    assert sorted(p.name for p in (experiment / "probe").iterdir()) == ["cache", "epochs-1", "epochs-5"]
    assert list((tmp_path / "results" / "traffic").iterdir()) == []  # nothing cached: gpu/ made and removed
    assert "nothing cached yet, nothing written" in said
    done = calls.read_text().splitlines()
    assert len(done) == 5 and all("--report-only --set model.dtype=\"bfloat16\"" in c for c in done)
    # The same arguments as the work's: the go test checks those of the steps.
    assert "--datasets arc_easy,openbookqa,commonsense_qa,arc_challenge" in done[0]
    assert "--aux-fractions 0.05,0.1,0.2,0.4" in done[1]
    assert "client.local_epochs=1" in done[2] and "client.local_epochs=5" in done[3]
    assert "data.max_train_examples=1848" in done[2] and "--methods centralized" in done[3]
    assert "--traffic-grid" in done[4] and "--out results/traffic/gpu" in done[4]
