"""scripts/gpu_session.sh: what a device call sends back of the jobs it could not finish, and how
the next session puts it back. (The jobs' own continuing is tested in test_experiment.py and
test_faults.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.sh"


def bash(script: str, cwd: Path, **env: str) -> str:
    done = subprocess.run(["bash", "-c", f"source {SCRIPT}; cd {cwd}; {script}"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, **env}, timeout=60)
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
    listed = bash("unfinished runs", tmp_path, RESUME_MIB="3").split()
    # Whole jobs only, up to 3 MiB: the centralized job (3 MiB) does not fit beside the others;
    # the finished job, a run still at round 0 (its start), and files that are not state
    # (metrics, adapters/) stay behind.
    assert sorted(listed) == ["experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client0.json",
                              "experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client1.pt",
                              "traffic-gpu/runs/openbookqa/fedcollm/seed0-b-v/checkpoint.pt"]

    # Sent in parts as `go` sends them, staged by the next session, restored under a new folder
    # that already holds a newer file of its own: that one is kept.
    parts = tmp_path / ".gpu" / "resume"
    parts.mkdir(parents=True)
    bash(f"unfinished runs | tar -c -C runs -T - | split -b 1M -d -a 2 - {parts}/resume.tar.part-", tmp_path,
         RESUME_MIB="3")
    assert len(list(parts.iterdir())) == 3
    new = tmp_path / "new"
    own = new / "experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client0.json"
    own.parent.mkdir(parents=True)
    own.write_text("newer")
    out = bash("restore new", tmp_path, RUNS=str(tmp_path / "device-tmp"))
    assert "restored 3 job files from .gpu/resume" in out
    assert own.read_text() == "newer"
    for path in ("traffic-gpu/runs/openbookqa/fedcollm/seed0-b-v/checkpoint.pt",
                 "experiment-gpu/runs/csqa/standalone/seed1-d-v/standalone-client1.pt"):
        assert (new / path).read_bytes() == (runs / path).read_bytes()
    assert not parts.exists()  # restored once: a second `go` keeps the newer state it made itself
