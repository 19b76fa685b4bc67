"""`flwr run .` runs the same Flower app (local simulation runtime, a real SuperLink process)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLWR = shutil.which("flwr") or str(Path(os.sys.executable).parent / "flwr")


def _kill_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves its local SuperLink running: end the processes that use this home."""
    out = subprocess.run(["pgrep", "-f", str(flwr_home / "local-superlink")], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not Path(FLWR).exists(), reason="flwr CLI not installed")
def test_flwr_run_completes_and_writes_outputs(tmp_path, mcq_files):
    train, evals = mcq_files
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 2\n")
    out = tmp_path / "out"
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'preset = "smoke"\n[data]\ndataset = "mcq_jsonl"\ntrain_file = "{train}"\n'
                   f'eval_file = "{evals}"\nnum_clients = 2\n[federation]\nrounds = 1\n'
                   f'[run]\nout_dir = "{out}"\nprogress = false\n')
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{Path(FLWR).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        run = subprocess.run([FLWR, "run", str(ROOT), "--stream", "--run-config", f'config-file="{cfg}"'],
                             env=env, capture_output=True, text=True, timeout=480)
        listed = subprocess.run([FLWR, "list", "--format", "json"], env=env, capture_output=True,
                                text=True, timeout=60)
    finally:
        _kill_local_superlink(home)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # `flwr run` can exit 0 although the ServerApp failed: the run's status is the verdict.
    status = [r["status"] for r in json.loads(listed.stdout)["runs"]]
    assert status == ["finished:completed"], listed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["num_clients"] == 2
    assert (out / "adapters" / "slm" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not Path(FLWR).exists(), reason="flwr CLI not installed")
def test_the_fab_carries_code_and_configs_never_data_or_results(tmp_path):
    """What `flwr run` ships to every SuperNode: the package and its configs. Data files in the
    project folder (.jsonl: a server's auxiliary set, say) and results stay home, which also
    keeps the FAB under Flower's 10 MB limit."""
    import zipfile  # noqa: PLC0415

    app = tmp_path / "app"
    for name in ("src", "configs", "results", "benchmarks"):
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        shutil.copy(ROOT / name, app / name)
    (app / "data").mkdir()
    (app / "data" / "aux.jsonl").write_text('{"question": "private"}\n')
    built = subprocess.run([FLWR, "build", "--app", str(app)], cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "src/fedcollm/federated/client_app.py" in names and "configs/experiment-gpu.toml" in names
    assert not [n for n in names if n.endswith(".jsonl") or n.startswith(("results/", "benchmarks/"))]
    assert fab.stat().st_size < 10 * 1024 * 1024
