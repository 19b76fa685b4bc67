"""Real deployment on loopback: a SuperLink and SuperNodes as processes, TLS and node auth on."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from fedcollm import components
from fedcollm.config import load_config
from fedcollm.errors import FedCoLLMError
from fedcollm.runs.certs import make_node_key, make_tls
from fedcollm.runs.deploy import deploy_local
from fedcollm.runs.simulation import run_simulation

pytestmark = pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs procps")


def _cfg(mcq_files, out, *extra):
    train, evals = mcq_files
    return load_config(preset="smoke", overrides=[
        'data.dataset="mcq_jsonl"', f'data.train_file="{train}"', f'data.eval_file="{evals}"',
        "data.num_clients=2", "run.progress=false", f'run.out_dir="{out}"', *extra])


def _write(path: Path, records) -> str:
    path.write_text("".join(json.dumps({"id": r.id, "question": r.question, "choices": list(r.choices),
                                        "answer": r.answer}) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def own_files(mcq_files, tmp_path_factory):
    """The simulation's split written out: the server's aux file and one file per client."""
    folder = tmp_path_factory.mktemp("files")
    train, split = components.train_split(_cfg(mcq_files, folder / "unused"))
    aux = _write(folder / "aux.jsonl", [train[i] for i in split.aux])
    clients = [_write(folder / f"client{k}.jsonl", [train[i] for i in part]) for k, part in enumerate(split.clients)]
    return aux, clients, max(len(p) for p in split.clients)


@pytest.fixture(scope="module")
def deployed(mcq_files, own_files, tmp_path_factory):
    """A deployment whose server is given no training data at all: only its aux file and the
    eval file. Each SuperNode trains on its own file (node-config train-file)."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    aux, clients, largest = own_files
    _, evals = mcq_files
    cfg = load_config(preset="smoke", overrides=[
        'data.dataset="mcq_jsonl"', f'data.aux_file="{aux}"', f'data.eval_file="{evals}"',
        "data.num_clients=2", f"federation.max_client_examples={largest}", "run.progress=false",
        f'run.out_dir="{out}"'])
    assert cfg.data.train_file == ""
    return out, deploy_local(cfg, unregistered=1, timeout=600, train_files=clients)


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
    # Round 2's SuperNodes rebuilt the server's adapter from round 2's change alone: each kept
    # round 1's in its context.state (federated/reference.py).
    assert [r["sent_whole"] for r in rows[1:]] == [0, 0]
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
    """The simulation on the shared split equals the deployment whose server never saw the
    clients' data: the server's aux file and the clients' own files are that split's parts."""
    out, _ = deployed
    cfg = _cfg(mcq_files, tmp_path / "sim")
    run_simulation(cfg)
    sim = load_file(tmp_path / "sim" / "adapters" / "slm" / "adapter_model.safetensors")
    dep = load_file(out / "adapters" / "slm" / "adapter_model.safetensors")
    assert sim.keys() == dep.keys()
    for k in sim:
        np.testing.assert_allclose(sim[k], dep[k], rtol=1e-4, atol=1e-6)
    run_toml = (out / "deployment" / "run.toml").read_text()
    assert "client0.jsonl" not in run_toml and "train_file" in run_toml and 'train_file = ""' in run_toml


def test_server_with_an_aux_file_never_reads_the_training_split(own_files, mcq_files, monkeypatch):
    from fedcollm.data import loaders  # noqa: PLC0415

    aux, _, largest = own_files
    _, evals = mcq_files
    cfg = load_config(preset="smoke", overrides=[
        'data.dataset="mcq_jsonl"', f'data.aux_file="{aux}"', f'data.eval_file="{evals}"',
        "data.num_clients=2", f"federation.max_client_examples={largest}"])

    def no_training_split(*_):
        raise AssertionError("the server opened the training split")

    monkeypatch.setattr(components, "load_train", no_training_split)
    monkeypatch.setattr(loaders, "load_train", no_training_split)
    data = components.server_data(cfg)
    assert len(data.aux.llm) == len(loaders.read_records(aux)) and data.client_sizes is None


def _processes_of(home: Path) -> list:
    """Processes started with FLWR_HOME = home: this deployment's SuperLink, SuperNodes and ServerApp."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("FLWR_HOME") == str(home):
                found.append(proc)
    return found


def test_a_run_that_does_not_finish_leaves_no_process_behind(mcq_files, tmp_path):
    # The SuperLink starts the ServerApp in a session of its own; a run stopped before it ended
    # (here: out of time while it runs) used to leave that ServerApp running, its models in memory.
    train, evals = mcq_files
    cfg = load_config(preset="smoke", overrides=[
        'data.dataset="mcq_jsonl"', f'data.train_file="{train}"', f'data.eval_file="{evals}"',
        "data.num_clients=2", "federation.rounds=30", "run.progress=false", f'run.out_dir="{tmp_path / "run"}"'])
    with pytest.raises(FedCoLLMError, match="deployment run .* ended as 'running'"):  # 30 rounds take minutes
        deploy_local(cfg, timeout=30)
    assert _processes_of(tmp_path / "run" / "deployment" / "flwr-home") == []


def test_deploy_local_clients_sets_the_number_of_clients(monkeypatch):
    import argparse  # noqa: PLC0415

    from fedcollm import cli  # noqa: PLC0415

    seen = {}

    def fake_deploy(cfg, **_):
        seen["cfg"] = cfg
        return {"rounds": 0, "slm": None, "llm": None, "deployment": {}}

    monkeypatch.setattr("fedcollm.runs.deploy.deploy_local", fake_deploy)
    args = argparse.Namespace(config=None, preset="smoke", overrides=[], out=None, clients=2, timeout=1.0)
    assert cli.cmd_deploy_local(args) == 0
    assert seen["cfg"].data.num_clients == 2


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


