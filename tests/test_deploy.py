"""Real deployment on loopback: a SuperLink and SuperNodes as processes, TLS and node auth on."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedcollm.config import load_config
from fedcollm.runs.certs import make_node_key, make_tls
from fedcollm.runs.deploy import deploy_local
from fedcollm.runs.simulation import run_simulation

pytestmark = pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs procps")


def _cfg(mcq_files, out):
    train, evals = mcq_files
    return load_config(preset="smoke", overrides=[
        'data.dataset="mcq_jsonl"', f'data.train_file="{train}"', f'data.eval_file="{evals}"',
        "data.num_clients=2", "run.progress=false", f'run.out_dir="{out}"'])


@pytest.fixture(scope="module")
def deployed(mcq_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    return out, deploy_local(_cfg(mcq_files, out), unregistered=1, timeout=600)


def test_deployment_completes_with_the_simulation_outputs(deployed):
    out, summary = deployed
    assert summary["deployment"]["status"] == "finished:completed"
    assert summary["deployment"]["tls"] and summary["deployment"]["supernode_auth"]
    assert summary["rounds"] == 2
    for name in ("config.toml", "metrics.jsonl", "summary.json", "report.md", "accuracy.png",
                 "adapters/slm/adapter_model.safetensors", "adapters/llm/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients_ok"] == 2 for r in rows[1:])
    left = subprocess.run(["pgrep", "-f", str(out / "deployment")], capture_output=True, text=True)
    assert left.stdout.strip() == "", "deployment processes were left running"


def test_unregistered_supernode_is_refused(deployed):
    out, _ = deployed
    nodes = json.loads((out / "deployment" / "supernodes.json").read_text())["nodes"]
    assert len(nodes) == 2  # the third SuperNode's key was never registered
    log = (out / "deployment" / "supernode2.log").read_text()
    assert "Failed to activate SuperNode" in log  # refused by the SuperLink at activation
    assert "fedcollm] client" not in log, "the unregistered SuperNode trained"


def test_simulation_and_deployment_give_the_same_adapter(deployed, mcq_files, tmp_path):
    out, _ = deployed
    cfg = _cfg(mcq_files, tmp_path / "sim")
    run_simulation(cfg)
    sim = load_file(tmp_path / "sim" / "adapters" / "slm" / "adapter_model.safetensors")
    dep = load_file(out / "adapters" / "slm" / "adapter_model.safetensors")
    assert sim.keys() == dep.keys()
    for k in sim:
        np.testing.assert_allclose(sim[k], dep[k], rtol=1e-4, atol=1e-6)


def test_credentials_are_what_flower_expects(tmp_path):
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key  # noqa: PLC0415

    tls = make_tls(tmp_path, hosts=("127.0.0.1", "superlink.example"))
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example" in names.get_values_for_type(x509.DNSName)
    priv, pub = make_node_key(tmp_path, "n0")
    assert load_ssh_private_key(priv.read_bytes(), None).public_key().public_numbers() == \
        load_ssh_public_key(pub.read_bytes()).public_numbers()
    assert oct(priv.stat().st_mode)[-3:] == "600"


def test_config_with_other_client_count_is_refused(mcq_files, tmp_path):
    from fedcollm.errors import FedCoLLMError  # noqa: PLC0415

    with pytest.raises(FedCoLLMError, match="--clients 3 differs from data.num_clients = 2"):
        deploy_local(dataclasses.replace(_cfg(mcq_files, tmp_path)), clients=3)
