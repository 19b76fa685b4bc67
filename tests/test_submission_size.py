"""scripts/submission_size.sh: a change too large for a stop is named before the stop, with the
files that make it so (session 25's submission was refused for size and its GPU results lost)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "submission_size.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _size_check(repo: Path, base: str, **limits: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), base], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **limits})


def test_a_change_over_the_margin_of_a_limit_fails_and_names_its_largest_file(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "results").mkdir()
    (repo / "results" / "state.bin").write_bytes(os.urandom(3 << 20))  # incompressible, like model state
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "results")

    small = _size_check(repo, base, PACK_LIMIT_MIB="4", DIFF_LIMIT_MIB="100")  # 3 MiB > half of 4
    assert small.returncode == 1, small.stdout + small.stderr
    assert "over 0.5 of a limit" in small.stderr
    assert "3.0 MiB  results/state.bin" in small.stdout and "1 commits" in small.stdout

    diff = _size_check(repo, base, PACK_LIMIT_MIB="100", DIFF_LIMIT_MIB="6")  # as a binary patch: > 3 MiB
    assert diff.returncode == 1, diff.stdout

    roomy = _size_check(repo, base, PACK_LIMIT_MIB="100", DIFF_LIMIT_MIB="100")
    assert roomy.returncode == 0, roomy.stderr
    packed = float(roomy.stdout.split("packed ")[1].split(" MiB")[0])
    assert 2.9 < packed < 3.2
