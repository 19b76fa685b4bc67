"""A real Flower deployment on this machine: one SuperLink and N SuperNodes as separate
processes talking over loopback, TLS and SuperNode authentication on, running the same app.

    fedcollm deploy-local --clients N [--config F] [--set k=v ...] [--out DIR]

Each SuperNode is told by --node-config which data part it holds. The run's verdict is its
status on the SuperLink (`flwr list`: finished:completed), never `flwr run`'s exit code.
Everything started here is stopped again, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w

from fedcollm.config import Config
from fedcollm.errors import FedCoLLMError
from fedcollm.runs.certs import make_node_key, make_tls

CONNECTION = "fedcollm-local"


def project_root() -> Path:
    """The Flower app folder (holds pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise FedCoLLMError(f"deploy-local needs the fedcollm source checkout (no pyproject.toml in {root})")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FedCoLLMError(f"{name} not found: install flwr in this environment")
    return found


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise FedCoLLMError(f"the SuperLink exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FedCoLLMError(f"the SuperLink did not open port {port} within {timeout:.0f} s; see {log}")


@dataclass
class Federation:
    """Processes of a local federation; `stop` ends each process group."""
    folder: Path
    env: dict
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)  # its own group: children die with it
        self.procs.append(proc)
        return proc

    def ours(self) -> list[psutil.Process]:
        """Every live process of this deployment, found by the FLWR_HOME they all inherit: also
        one that no longer descends from the processes started here."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid != os.getpid() and proc.environ().get("FLWR_HOME") == self.env["FLWR_HOME"]:
                    found.append(proc)
        return found

    def stop(self) -> None:
        # The SuperLink starts the ServerApp in a session of its own: collect every descendant
        # first, or a ServerApp (with its models in memory) outlives a run that did not finish.
        # And by FLWR_HOME, which they all inherit: once in many runs a test found a ServerApp
        # still running after a stop that had collected descendants only.
        family = self.ours()
        for proc in self.procs:
            try:
                family += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        for child in psutil.wait_procs(family, timeout=5)[1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        late = self.ours()  # started while this was stopping the others
        for child in late:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(late, timeout=5)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)


def run_status(fed: Federation, run_id: int) -> str:
    res = fed.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
    try:
        return json.loads(res.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"


def deploy_local(cfg: Config, unregistered: int = 0, timeout: float = 3600.0,
                 train_files: list[str] | tuple[str, ...] = ()) -> dict:
    """Run cfg on a local SuperLink + data.num_clients SuperNodes (TLS, node auth); return the
    summary.

    `train_files`, one per client, gives each SuperNode its own data (node-config train-file):
    the server's config then need not name any training data. `unregistered` extra SuperNodes
    start with keys the SuperLink does not know (they must be refused). Raises FedCoLLMError
    unless the run's status is finished:completed.
    """
    n = cfg.data.num_clients
    if train_files and len(train_files) != n:
        raise FedCoLLMError(f"deploy-local: {len(train_files)} train files for {n} clients")
    out = Path(cfg.run.out_dir).resolve()
    folder = out / "deployment"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tls = make_tls(folder / "certs")
    port = free_port()
    home = folder / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": CONNECTION,
        CONNECTION: {"address": f"127.0.0.1:{port}", "root-certificates": str(tls.ca_cert)}}}))
    run_file = folder / "run.toml"  # the resolved config; the ServerApp runs in another cwd
    run_file.write_text(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out))).to_toml())
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    fed = Federation(folder, env)
    with ExitStack() as stack:
        stack.callback(fed.stop)
        link = fed.start("superlink", [
            _bin("flower-superlink"), "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(folder / "state.db")])
        wait_for_port(port, link, 60, folder / "superlink.log")
        for i in range(n + unregistered):
            priv, pub = make_node_key(folder / "keys", f"node{i}")
            if i < n:
                reg = fed.flwr("supernode", "register", str(pub), CONNECTION)
                if reg.returncode != 0:
                    raise FedCoLLMError(f"registering SuperNode {i} failed: {(reg.stderr or reg.stdout).strip()[-300:]}")
            fed.start(f"supernode{i}", [
                _bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(tls.ca_cert), "--auth-supernode-private-key", str(priv),
                "--node-config", f"partition-id={i % n} num-partitions={n}"
                + (f' train-file="{Path(train_files[i % n]).resolve()}"' if train_files else ""),
                "--port", str(free_port())])
        started = fed.flwr("run", str(project_root()), CONNECTION, "--format", "json",
                           "--run-config", f'config-file="{run_file}"')
        try:
            run_id = int(json.loads(started.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError, ValueError):
            raise FedCoLLMError(f"flwr run did not start a run: {(started.stdout + started.stderr).strip()[-500:]}") from None
        print(f"[fedcollm] deployment run {run_id}: SuperLink 127.0.0.1:{port} (TLS, node auth), "
              f"{n} SuperNodes; logs in {folder}", flush=True)
        end = time.time() + timeout
        status = run_status(fed, run_id)
        while not status.startswith("finished") and time.time() < end:
            time.sleep(2)
            status = run_status(fed, run_id)
        (folder / "serverapp.log").write_text(fed.flwr("log", str(run_id), CONNECTION, "--show").stdout)
        if status != "finished:completed":
            raise FedCoLLMError(f"deployment run {run_id} ended as {status!r}; see {folder}/serverapp.log")
        nodes = fed.flwr("supernode", "list", CONNECTION, "--format", "json").stdout
        (folder / "supernodes.json").write_text(nodes)
    summary = json.loads((out / "summary.json").read_text())
    summary["deployment"] = {"run_id": run_id, "status": status, "supernodes": n, "tls": True,
                             "supernode_auth": True, "unregistered_started": unregistered}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
