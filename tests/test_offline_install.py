"""Offline install: scripts/wheelhouse.sh makes a folder of wheels (pieces and bundles included), and
scripts/setup.sh --offline installs fedcollm and the model from it into a clean venv with every
index switched off and a dead proxy for any network access."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checkout_copy(dest: Path) -> Path:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("src", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _clean_env(**extra) -> dict:
    """This process's environment without PYTHONPATH (in-process Ray simulations of other tests
    may have set it to this checkout's src/), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}


def _run(cmd, env=None, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or _clean_env(), **kw)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_host_packages_and_what_only_they_need_are_left_out():
    env = _clean_env(PYTHON=sys.executable)
    out = _run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), "/nonexistent", "--host-has", "torch transformers",
                "--dry-run"], env=env, timeout=600).stdout
    wanted = {line.split("==")[0].lower() for line in out.splitlines() if "==" in line}
    assert {"flwr", "peft", "ray", "safetensors", "numpy"} <= wanted
    # the host's packages, and torch's / transformers' own dependencies, are not downloaded
    assert not wanted & {"torch", "transformers", "sympy", "networkx", "tokenizers", "nvidia-cudnn-cu12"}


def test_setup_offline_installs_from_a_wheelhouse_without_network(tmp_path):
    (tmp_path / "checkout").mkdir()
    checkout = _checkout_copy(tmp_path / "checkout")
    house = tmp_path / "wheels"
    env = _clean_env(PYTHON=sys.executable)
    _run(["bash", str(checkout / "scripts" / "wheelhouse.sh"), str(house), "--split-mb", "40", "--bundle-mb", "60"],
         env=env, timeout=1800)
    assert list(house.glob("bundle-*/*.whl.part-00")), "expected the large wheels cut into pieces"
    bundles = sorted(house.iterdir())
    assert len(bundles) > 1 and all(b.name.startswith("bundle-") for b in bundles), bundles
    assert all(sum(f.stat().st_size for f in b.iterdir()) <= 60 * 1024 * 1024 for b in bundles)
    offline = _clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="",
                   http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
                   PYTHON=shutil.which("python3") or sys.executable)
    _run(["bash", str(checkout / "scripts" / "setup.sh"), "--offline", str(house)], env=offline, timeout=1800)
    assert not list(house.glob("*.part-*")), "the pieces were joined"
    assert not list(house.glob("bundle-*")), "the bundles were gathered"
    python = checkout / ".venv" / "bin" / "python"
    probe = _run([str(python), "-c", (
        "import fedcollm, flwr, peft, transformers, torch, ray;"
        "from fedcollm.models.loading import smollm2_gguf; p = smollm2_gguf();"
        "print(fedcollm.__file__); print(p.stat().st_size)")], timeout=300).stdout.splitlines()
    assert probe[0].startswith(str(checkout / "src"))  # the checkout itself, editable
    assert int(probe[1]) > 50_000_000  # the model's GGUF file arrived whole
    _run([str(checkout / ".venv" / "bin" / "fedcollm"), "--help"], timeout=120)


def test_setup_offline_uses_the_packages_of_a_host_virtual_environment(tmp_path):
    """GPU hosts often keep torch in a virtual environment of their own (/opt/torch/.venv on the
    lent H200): `venv --system-site-packages` does not reach it, and the install failed there
    ("No matching distribution found for torch"). This test's own interpreter plays that host."""
    (tmp_path / "checkout").mkdir()
    checkout = _checkout_copy(tmp_path / "checkout")
    house = tmp_path / "wheels"
    # The host has everything but the build backend, which pip's isolated build takes from here.
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(house), "setuptools>=68"], timeout=600)
    _run(["bash", "-c", f"cd {house} && sha256sum -- *.whl > SHA256SUMS"])
    offline = _clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS="", http_proxy="http://127.0.0.1:9",
                         https_proxy="http://127.0.0.1:9", PYTHON=sys.executable)
    _run(["bash", str(checkout / "scripts" / "setup.sh"), "--offline", str(house)], env=offline, timeout=1200)
    probe = _run([str(checkout / ".venv" / "bin" / "python"), "-c",
                  "import torch, fedcollm; print(torch.__file__); print(fedcollm.__file__)"]).stdout.splitlines()
    assert probe[0].startswith(sys.prefix), "torch comes from the host's environment"
    assert probe[1].startswith(str(checkout / "src"))
