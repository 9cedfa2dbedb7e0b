"""Deployment end to end: a secure SuperLink, real SuperNodes, ``flwr run``.

Everything runs on loopback from this checkout's virtualenv, each process in its
own process group and with its own ``FLWR_HOME`` (as on separate machines), and is
stopped by the script when it ends, also on failure, SIGTERM or Ctrl-C:

1. credentials: ``scripts/make_certs.sh`` (local CA, server certificate for
   localhost/127.0.0.1, one ECDSA P-384 key pair per SuperNode);
2. a SuperLink with TLS and SuperNode authentication (``--enable-supernode-auth``);
   the user's ``FLWR_HOME/config.toml`` names it as connection ``deploy``; the
   SuperNodes' public keys are registered with ``flwr supernode register``;
3. SuperNodes ``site-a`` (cnn) and ``site-b`` (resnet10: BatchNorm state) with
   their node config (``client-name``, ``model``, ``data-dir``, ``state-dir``, a
   partition of a generated 10-class image folder);
4. ``flwr run . deploy``: ``--rounds`` rounds of MH-pFedHN, during which a
   SuperNode with a never-registered key tries to join and must be refused;
   checks ``metrics.jsonl`` (every round, both clients), ``clients.json`` (names,
   node ids, parameter counts), ``flwr ls`` and ``flwr log``;
5. the restart case (``--restart-rounds``; 0 skips it): a longer run during which
   ``site-b`` is stopped after round 1 and started again with the same key and
   ``state-dir`` (same node id: SuperNode authentication binds node ids to keys),
   then stopped again and brought back on a newly registered key, as after moving
   to a new machine (new node id, same ``client-name``). Checks: ``clients.json``
   has the new node id under ``site-b``, the server logged the reconnection, each
   restarted SuperNode restored the saved state and trained later rounds, and
   later rows of ``metrics.jsonl`` carry ``site-b``'s accuracy;
6. the setting of step 4 in simulation (``tools.superlink``): the same numbers
   per round, and seconds per round of both.

``--insecure`` runs step 4 without TLS and authentication (the guide's local
experiment mode); ``--app DIR`` submits another app folder. Exit status 0 when
every check passed; ``--workdir`` keeps logs, results and ``report.json``.
``make deploy-test`` runs it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import processes  # noqa: E402
from tools.superlink import SimulationSuperLink, as_overrides, free_port  # noqa: E402

CONNECTION = "deploy"
#: Trainable parameters of the zoo models on 32x32 RGB images with 10 classes.
NUM_PARAMS = {"cnn": 234006, "vgg8": 268814, "resnet10": 347178}
SITES = {  # client-name -> (model, partition-id); resnet10 has BatchNorm state
    "site-a": ("cnn", 0),
    "site-b": ("resnet10", 1),
}


class Failure(AssertionError):
    """A check of the deployment test failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def say(message: str) -> None:
    print(f"[deploy-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes -------------------------------------------------------------------------
class Processes:
    """Every long-running process this script starts, each in its own group."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen, int]] = {}

    def start(
        self, name: str, cmd: list[str], env: dict, cwd: Path, log: Path
    ) -> subprocess.Popen:
        with log.open("a") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = (proc, proc.pid)  # session leader: group id == pid
        return proc

    def stop(self, name: str, grace: float = 20.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``grace`` seconds.

        Flower starts some children in sessions of their own (the SuperLink's
        SuperExec and its ServerApps): they are looked up before the leader goes
        and stopped too if they outlive it.
        """
        if name not in self.procs:
            return
        proc, group = self.procs.pop(name)
        children = processes.identities(processes.descendants(proc.pid))
        processes.signal_group(group, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            processes.signal_group(group, signal.SIGKILL)
            proc.wait(timeout=10)
        # Children (a ClientApp mid-message, the SuperExec) may outlive the leader.
        deadline = time.monotonic() + 5.0
        while processes.group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if processes.group_alive(group):
            processes.signal_group(group, signal.SIGKILL)
        processes.stop_family(children)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            try:
                self.stop(name)
            except Exception as err:  # noqa: BLE001 - keep stopping the others
                print(f"could not stop {name}: {err}", file=sys.stderr)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, poll=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise Failure(f"timed out after {timeout:.0f} s waiting for {what}")


# -- data ------------------------------------------------------------------------------
def write_image_folder(root: Path, classes: int = 10, per_class: int = 40) -> Path:
    """A small ``imagefolder`` dataset whose classes are learnable (colour + stripe)."""
    rng = np.random.default_rng(7)
    for c in range(classes):
        folder = root / "train" / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.full((32, 32, 3), 40, np.float32)
        base[..., c % 3] = 170
        row = (c * 3) % 28
        base[row : row + 4] = 250
        for i in range(per_class):
            noise = rng.normal(0, 25, base.shape)
            image = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


# -- the deployment --------------------------------------------------------------------
class Deployment:
    """A TLS + node-auth SuperLink, its SuperNodes and the user's flwr CLI."""

    def __init__(
        self,
        work: Path,
        procs: Processes,
        data_dir: Path,
        insecure: bool = False,
        app: str = ".",
    ) -> None:
        self.work = work
        self.insecure = insecure
        self.app = app  # what `flwr run` submits, relative to the checkout
        self.procs = procs
        self.data_dir = data_dir
        self.certs = work / "certs"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_ids: dict[str, int] = {}  # key name -> registered node id
        self.node_ports: dict[str, int] = {}
        self.base_env = os.environ | {
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        # The user's machine: the flwr CLI with the connection to the SuperLink.
        self.user_home = work / "user-flwr-home"
        self.user_home.mkdir(parents=True, exist_ok=True)
        tls = (
            "insecure = true\n"
            if insecure
            else f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )
        (self.user_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{tls}'
        )

    def env(self, home: Path) -> dict:
        home.mkdir(parents=True, exist_ok=True)
        return self.base_env | {"FLWR_HOME": str(home)}

    def make_credentials(self, key_names: list[str]) -> None:
        cmd = ["bash", str(ROOT / "scripts" / "make_certs.sh"), str(self.certs)]
        subprocess.run(cmd + key_names, check=True, capture_output=True, text=True)

    def start_superlink(self) -> None:
        security = [
            "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.pem"),
            "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth",
        ]  # fmt: skip
        cmd = [
            str(BIN / "flower-superlink"),
            *(["--insecure"] if self.insecure else security),
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        home = self.work / "superlink"
        self.procs.start(
            "superlink", cmd, self.env(home / "flwr-home"), home, self.superlink_log
        )
        wait_for(
            "the SuperLink to serve HTTPS",
            lambda: (
                "Uvicorn running on http" in self.read(self.superlink_log)
                or self._exited("superlink")
            ),
            60,
        )
        check(not self._exited("superlink"), "flower-superlink exited at start")

    @property
    def superlink_log(self) -> Path:
        return self.logs / "superlink.log"

    def _exited(self, name: str) -> bool:
        entry = self.procs.procs.get(name)
        return entry is None or entry[0].poll() is not None

    @staticmethod
    def read(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """The user's ``flwr`` CLI (its own ``FLWR_HOME``), from the app folder."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=ROOT,
            env=self.env(self.user_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def flwr_json(self, *args: str) -> dict:
        proc = self.flwr(*args, "--format", "json")
        try:
            payload = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError as err:
            raise Failure(f"flwr {' '.join(args)}: {proc.stdout}{proc.stderr}") from err
        check(payload.get("success") is True, f"flwr {' '.join(args)}: {payload}")
        return payload

    def register(self, key: str) -> int:
        """``flwr supernode register <key>.pub deploy``; returns the node id."""
        payload = self.flwr_json(
            "supernode", "register", str(self.certs / f"{key}.pub"), CONNECTION
        )
        self.node_ids[key] = int(payload["node-id"])
        return self.node_ids[key]

    def unregister(self, key: str) -> None:
        self.flwr_json(
            "supernode", "unregister", str(self.node_ids.pop(key)), CONNECTION
        )

    def node_status(self) -> dict[int, str]:
        payload = self.flwr_json("supernode", "ls", CONNECTION)
        return {int(n["node-id"]): n["status"] for n in payload["nodes"]}

    def wait_online_count(self, count: int, timeout: float = 90.0) -> None:
        """Without authentication node ids are only known once nodes connect."""
        wait_for(
            f"{count} SuperNodes to be online",
            lambda: list(self.node_status().values()).count("online") >= count,
            timeout,
            poll=1.0,
        )

    def wait_online(self, key: str, timeout: float = 90.0) -> None:
        node_id = self.node_ids[key]
        wait_for(
            f"SuperNode {key} (node {node_id}) to be online",
            lambda: self.node_status().get(node_id) == "online",
            timeout,
            poll=1.0,
        )

    def node_config(self, name: str) -> str:
        model, pid = SITES[name]
        return (
            f'client-name="{name}" model="{model}" data-dir="{self.data_dir}" '
            f'state-dir="{self.work / "state" / name}" '
            f"partition-id={pid} num-partitions={len(SITES)}"
        )

    def node_log(self, key: str, start: int) -> Path:
        return self.logs / f"supernode-{key}-{start}.log"

    def start_supernode(self, key: str, name: str, start: int = 1) -> Path:
        """``flower-supernode`` with key ``key`` for client ``name``; its log."""
        port = self.node_ports.setdefault(key, free_port())
        security = [
            "--root-certificates", str(self.certs / "ca.crt"),
            "--auth-supernode-private-key", str(self.certs / key),
        ]  # fmt: skip
        cmd = [
            str(BIN / "flower-supernode"),
            "--superlink", self.address,
            *(["--insecure"] if self.insecure else security),
            "--port", str(port),  # the SuperNode's local runtime API
            "--node-config", self.node_config(name),
        ]  # fmt: skip
        site = self.work / "sites" / name
        log = self.node_log(key, start)
        self.procs.start(
            f"supernode-{key}", cmd, self.env(site / "flwr-home"), site, log
        )
        return log

    def stop_supernode(self, key: str) -> None:
        self.procs.stop(f"supernode-{key}")


# -- runs ------------------------------------------------------------------------------
def run_config(data_dir: Path, results: Path, rounds: int) -> dict:
    """MH-pFedHN with its defaults on the image folder; node config picks models."""
    return {
        "dataset": "imagefolder",
        "data-dir": str(data_dir),
        "models": ",".join(model for model, _ in SITES.values()),  # simulation
        "num-server-rounds": rounds,
        "results-dir": str(results),
        "run-name": "deploy",
        "round-timeout": 300.0,
    }


def parse_overrides(text: str) -> dict:
    """``'k1=1 k2="x"'`` (``flwr run --run-config`` syntax) as a dict."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text])


def start_flwr_run(dep: Deployment, config: dict, log: Path, name: str):
    """``flwr run . deploy --run-config ... --stream`` from the app folder."""
    cmd = [
        str(BIN / "flwr"), "run", dep.app, CONNECTION,
        "--run-config", as_overrides(config), "--stream",
    ]  # fmt: skip
    return dep.procs.start(name, cmd, dep.env(dep.user_home), ROOT, log)


def finish_flwr_run(
    proc: subprocess.Popen, log: Path, timeout: float, procs: Processes, name: str
) -> Path:
    """Wait for ``flwr run``; return the run's results directory."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise Failure(f"flwr run did not finish in {timeout:.0f} s; see {log}") from err
    finally:
        procs.stop(name)
    text = log.read_text(errors="replace")
    check(proc.returncode == 0, f"flwr run failed ({proc.returncode}):\n{text[-4000:]}")
    return results_dir(log)


def results_dir(log: Path) -> Path | None:
    match = re.search(r"Results directory: (\S+)", Deployment.read(log))
    return Path(match.group(1)) if match else None


def metric_rows(run_dir: Path | None) -> list[dict]:
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def check_results(run_dir: Path, rounds: int, node_ids: dict[str, int]) -> list[dict]:
    for name in ["config.json", "clients.json", "metrics.jsonl", "summary.json"]:
        check((run_dir / name).is_file(), f"{run_dir / name} is missing")
    clients = {c["name"]: c for c in json.loads((run_dir / "clients.json").read_text())}
    check(set(clients) == set(SITES), f"clients.json names {sorted(clients)}")
    for name, (model, _) in SITES.items():
        check(
            clients[name]["num_params"] == NUM_PARAMS[model],
            f"{name}: num_params {clients[name]['num_params']}, expected "
            f"{NUM_PARAMS[model]} ({model})",
        )
        if name in node_ids:
            check(
                clients[name]["node_id"] == node_ids[name],
                f"{name}: node id {clients[name]['node_id']} in clients.json, "
                f"registered {node_ids[name]}",
            )
    rows = metric_rows(run_dir)
    check(
        [r["round"] for r in rows] == list(range(1, rounds + 1)),
        f"metrics.jsonl rounds {[r['round'] for r in rows]}",
    )
    return rows


def seconds_per_round(rows: list[dict]) -> float:
    return float(np.mean([r["round_seconds"] for r in rows]))


# -- the scenarios ---------------------------------------------------------------------
def basic(dep: Deployment, procs: Processes, args, report: dict) -> None:
    mode = "WITHOUT TLS/auth" if dep.insecure else "over TLS with node auth"
    say(f"run 1: {args.rounds} rounds of MH-pFedHN {mode}")
    results = dep.work / "results-basic"
    log = dep.logs / "flwr-run-basic.log"
    t0 = time.perf_counter()
    config = run_config(dep.data_dir, results, args.rounds) | args.run_config
    proc = start_flwr_run(dep, config, log, "flwr-run-basic")
    if not dep.insecure:
        # A SuperNode whose key was never registered tries to join the running
        # federation: it must be refused, and the run must not notice.
        rogue_log = dep.start_supernode("rogue", "site-a", start=1)
        rogue_refused(dep, rogue_log, report)
    run_dir = finish_flwr_run(proc, log, args.timeout, procs, "flwr-run-basic")
    wall = time.perf_counter() - t0
    check(run_dir is not None, f"no results directory in {log}")
    # The run as the SuperLink lists it.
    run_id = run_id_of(log)
    listed = dep.flwr_json("ls", CONNECTION, "--run-id", str(run_id))["runs"]
    check(
        len(listed) == 1 and listed[0]["status"] == "finished:completed",
        f"flwr ls: {listed}\n{dep.read(log)[-3000:]}",
    )
    rows = check_results(run_dir, args.rounds, dep.node_ids)
    shown = dep.flwr("log", str(run_id), CONNECTION, "--show")
    check(f"Results directory: {run_dir}" in shown.stdout, f"flwr log: {shown}")
    for row in rows:
        check(
            set(row["client_accuracy"]) == set(SITES),
            f"round {row['round']}: accuracy of {sorted(row['client_accuracy'])}",
        )
    report["deployment"] = {
        "results": str(run_dir),
        "rounds": args.rounds,
        "wall_seconds": wall,
        "seconds_per_round": seconds_per_round(rows),
        "wall_seconds_per_round": wall / args.rounds,
        "final_accuracy": rows[-1]["accuracy"],
    }
    say(
        f"run 1 ok: {run_dir} | {wall:.1f} s wall, "
        f"{seconds_per_round(rows):.1f} s/round | accuracy per round "
        + ", ".join(f"{r['accuracy']:.3f}" for r in rows)
    )


def rogue_refused(dep: Deployment, log: Path, report: dict) -> None:
    """The SuperNode with an unregistered key never gets a node id."""
    proc = dep.procs.procs["supernode-rogue"][0]
    wait_for(
        "the unregistered SuperNode to give up", lambda: proc.poll() is not None, 90
    )
    text = dep.read(log)
    check(proc.returncode != 0, "the unregistered SuperNode exited with status 0")
    check("SuperNode ID:" not in text, "the unregistered SuperNode got a node id")
    refusal = "No SuperNode found with the given public key"
    check(refusal in dep.read(dep.superlink_log), "no refusal in the SuperLink log")
    registered = set(dep.node_status())
    check(
        registered == {dep.node_ids[n] for n in SITES},
        f"SuperLink lists nodes {sorted(registered)}",
    )
    lines = [x for x in text.splitlines() if "Exit Code" in x or "activate" in x]
    report["rogue"] = {"exit_code": proc.returncode, "log": lines}
    say(f"unregistered SuperNode refused (exit {proc.returncode}): {' | '.join(lines)}")


def simulation(dep: Deployment, args, report: dict) -> None:
    say(f"simulation: the same setting ({len(SITES)} clients, {args.rounds} rounds)")
    link = SimulationSuperLink(dep.work / "simulation").start()
    try:
        results = dep.work / "results-simulation"
        config = run_config(dep.data_dir, results, args.rounds) | args.run_config
        t0 = time.perf_counter()
        proc = link.run(
            config, len(SITES), timeout=args.timeout, app=(ROOT / dep.app).resolve()
        )
        wall = time.perf_counter() - t0
    finally:
        link.stop()
    (dep.logs / "flwr-run-simulation.log").write_text(proc.stdout + proc.stderr)
    check(proc.returncode == 0, f"simulation failed:\n{proc.stdout[-3000:]}")
    run_dir = results_dir(dep.logs / "flwr-run-simulation.log")
    rows = metric_rows(run_dir)
    check(len(rows) == args.rounds, f"simulation wrote {len(rows)} metric rows")
    report["simulation"] = {
        "results": str(run_dir),
        "wall_seconds": wall,
        "seconds_per_round": seconds_per_round(rows),
        "wall_seconds_per_round": wall / args.rounds,
        "final_accuracy": rows[-1]["accuracy"],
    }
    say(f"simulation ok: {wall:.1f} s wall, {seconds_per_round(rows):.1f} s/round")
    if "deployment" in report:  # same data, models, seeds: the same numbers
        deployed = metric_rows(Path(report["deployment"]["results"]))
        names = {f"client-{pid}": name for name, (_, pid) in SITES.items()}
        for sim, dep_row in zip(rows, deployed, strict=True):
            accuracy = {names[k]: v for k, v in sim["client_accuracy"].items()}
            check(
                accuracy == dep_row["client_accuracy"]
                and abs(sim["loss"] - dep_row["loss"]) < 1e-3,
                f"round {sim['round']}: simulation {accuracy} loss {sim['loss']}, "
                f"deployment {dep_row['client_accuracy']} loss {dep_row['loss']}",
            )
        say("simulation and deployment agree: per-client accuracy and loss per round")


def sent_train_replies(log: Path, run_id: int | None) -> list[int]:
    """Rounds of run ``run_id`` whose train reply a SuperNode delivered (its log)."""
    rounds, current, sending = [], None, None
    for line in Deployment.read(log).splitlines():
        if match := re.search(r"\[RUN (\d+), ROUND (\d+)\]", line):
            current = (int(match.group(1)), int(match.group(2)))
        elif "Sending: train message" in line:
            sending = current
        elif "Sent successfully" in line and sending is not None:
            if sending[0] == run_id:
                rounds.append(sending[1])
            sending = None
    return rounds


def run_id_of(log: Path) -> int | None:
    match = re.search(r"Successfully started run (\d+)", Deployment.read(log))
    return int(match.group(1)) if match else None


def restart(dep: Deployment, procs: Processes, args, report: dict) -> None:
    rounds = args.restart_rounds
    say(f"run 2: {rounds} rounds; site-b restarts twice (same key, then a new key)")
    results = dep.work / "results-restart"
    log = dep.logs / "flwr-run-restart.log"
    t0 = time.perf_counter()
    config = run_config(dep.data_dir, results, rounds) | args.run_config
    proc = start_flwr_run(dep, config, log, "flwr-run-restart")

    def trained(node_log: Path) -> int:
        """The last round whose train reply site-b delivered (0 before any).

        A SuperNode stopped while it sends a reply leaves the SuperLink with a
        half-pushed reply, which the server then waits on for minutes; so this
        test stops SuperNodes right after a delivered reply.
        """
        check(proc.poll() is None, f"flwr run ended early:\n{dep.read(log)[-3000:]}")
        return max(sent_train_replies(node_log, run_id_of(log)), default=0)

    events: list[dict] = []
    old_id = dep.node_ids["site-b"]
    # Restart 1: site-b trained round 1; stop it, start it again with the same key
    # and state-dir, as after a reboot.
    log0 = dep.node_log("site-b", 1)
    stopped = wait_for("site-b to train round 1", lambda: trained(log0), args.timeout)
    dep.stop_supernode("site-b")
    status = dep.node_status().get(old_id)
    say(f"stopped site-b after it trained round {stopped} (node {old_id}: {status})")
    log1 = dep.start_supernode("site-b", "site-b", start=2)
    dep.wait_online("site-b")
    events.append({"restart": 1, "stopped_after_round": stopped, "node_id": old_id})
    say(f"site-b is back with the same key: node {old_id}")
    # Restart 2, once it trained again: a new machine with a new key (unregister
    # the old key, register the new one), same client-name and state-dir.
    stopped = wait_for("site-b to train again", lambda: trained(log1), args.timeout)
    dep.stop_supernode("site-b")
    dep.unregister("site-b")
    new_id = dep.register("site-b-2")
    log2 = dep.start_supernode("site-b-2", "site-b", start=3)
    dep.wait_online("site-b-2")
    events.append({"restart": 2, "stopped_after_round": stopped, "node_id": new_id})
    say(f"site-b trained round {stopped}, is back on a new key: node {new_id}")

    run_dir = finish_flwr_run(proc, log, args.timeout, procs, "flwr-run-restart")
    wall = time.perf_counter() - t0
    check(run_dir is not None, f"no results directory in {log}")
    all_rows = check_results(run_dir, rounds, {"site-a": dep.node_ids["site-a"]})
    clients = {c["name"]: c for c in json.loads((run_dir / "clients.json").read_text())}
    check(
        clients["site-b"]["node_id"] == new_id,
        f"clients.json: site-b at node {clients['site-b']['node_id']}, not {new_id}",
    )
    reconnected = f"client 'site-b' reconnected from node {new_id} (was {old_id})"
    check(reconnected in dep.read(log), "the server did not log site-b's return")
    for event, node_log in zip(events, [log1, log2], strict=True):
        restored = [x for x in dep.read(node_log).splitlines() if "restored" in x]
        check(
            any("model-buffers" in x for x in restored),
            f"restart {event['restart']}: no state restored in {node_log}",
        )
        event["log"] = restored[0].split("client 'site-b': ")[-1]
        check(
            f"SuperNode ID: {event['node_id']}" in dep.read(node_log),
            f"restart {event['restart']}: not node {event['node_id']} ({node_log})",
        )
        # The restarted SuperNode trained and delivered later rounds.
        event["trained_rounds"] = sent_train_replies(node_log, run_id_of(log))
        check(
            event["trained_rounds"] != [],
            f"restart {event['restart']}: no train reply from {node_log}",
        )
        # The round it missed (stopped in) is evaluated in the next one; later
        # rows carry site-b's accuracy again.
        later = [r for r in all_rows if r["round"] > event["stopped_after_round"] + 1]
        event["rows_with_site_b"] = [
            r["round"] for r in later if "site-b" in r["client_accuracy"]
        ]
        check(
            event["rows_with_site_b"] != [],
            f"restart {event['restart']}: no later round has site-b's accuracy",
        )
    report["restart"] = {
        "results": str(run_dir),
        "wall_seconds": wall,
        "seconds_per_round": seconds_per_round(all_rows),
        "events": events,
        "server_log": reconnected,
        "clients_json_site_b": clients["site-b"],
        "client_accuracy_by_round": {
            r["round"]: r["client_accuracy"] for r in all_rows
        },
    }
    say(f"run 2 ok: {run_dir} | {wall:.1f} s wall")
    for r in all_rows:
        say(f"  round {r['round']}: {json.dumps(r['client_accuracy'])}")
    for event in events:
        say(
            f"  restart {event['restart']} (node {event['node_id']}): {event['log']}; "
            f"then trained rounds {event['trained_rounds']}"
        )
    say(f"  server: {reconnected}")
    say(f"  clients.json site-b: {json.dumps(clients['site-b'])}")


def killed_mid_round(dep: Deployment, procs: Processes, args, report: dict) -> None:
    """A SuperNode killed (SIGKILL) while it trains: the round completes with the
    other client's reply once the SuperLink reports the node unavailable, and the
    run finishes without it."""
    rounds = args.kill_rounds
    say(f"run 3: {rounds} rounds; site-a is killed while it trains round 2")
    log = dep.logs / "flwr-run-kill.log"
    config = run_config(dep.data_dir, dep.work / "results-kill", rounds)
    proc = start_flwr_run(dep, config | args.run_config, log, "flwr-run-kill")
    node_log = dep.node_log("site-a", 1)

    def training_round_2() -> bool:
        check(proc.poll() is None, f"flwr run ended early:\n{dep.read(log)[-3000:]}")
        delivered = sent_train_replies(node_log, run_id_of(log))
        received = dep.read(node_log).count("Receiving: train message")
        return 1 in delivered and received >= before + 2

    before = dep.read(node_log).count("Receiving: train message")  # earlier runs
    wait_for("site-a to receive round 2's train message", training_round_2,
             args.timeout)  # fmt: skip
    popen = procs.procs["supernode-site-a"][0]
    os.killpg(os.getpgid(popen.pid), signal.SIGKILL)
    t_kill = time.perf_counter()
    say("killed site-a (SIGKILL) in round 2")
    run_dir = finish_flwr_run(proc, log, args.timeout, procs, "flwr-run-kill")
    check(run_dir is not None, f"no results directory in {log}")
    rows = metric_rows(run_dir)
    check([r["round"] for r in rows] == list(range(1, rounds + 1)),
          f"rounds {[r['round'] for r in rows]}")  # fmt: skip
    after = [r for r in rows if r["round"] >= 2]
    counts = [r["train_clients"] for r in after]
    check(all(c == 1 for c in counts), f"train clients after the kill: {counts}")
    check(sum(r["rejected_replies"] for r in after) >= 1, "no rejected reply counted")
    rejected = [x for x in dep.read(log).splitlines() if "rejected" in x]
    report["killed_mid_round"] = {
        "results": str(run_dir),
        "seconds_from_kill_to_end": time.perf_counter() - t_kill,
        "train_clients_by_round": {r["round"]: r["train_clients"] for r in rows},
        "server_log": rejected[:2],
    }
    say(f"run 3 ok: rounds finished without site-a; server: {rejected[:1]}")


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep everything here")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--restart-rounds", type=int, default=6, help="0: skip")
    parser.add_argument(
        "--kill-rounds",
        type=int,
        default=0,
        help="> 0: also kill a SuperNode mid-round in a run of this many rounds",
    )
    parser.add_argument("--no-simulation", action="store_true")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no SuperNode authentication (local experiments); basic run only",
    )
    parser.add_argument(
        "--run-config",
        type=parse_overrides,
        default={},
        help="extra run-config overrides, e.g. 'hn-window=0'",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, s")
    parser.add_argument("--data-dir", type=Path, help="image folder (default: made)")
    parser.add_argument("--app", default=".", help="app folder for flwr run")
    args = parser.parse_args(argv)

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="deploy-test-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    atexit.register(procs.stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    report: dict[str, Any] = {"workdir": str(work)}
    t_start = time.perf_counter()
    ok = False
    try:
        data_dir = (args.data_dir or write_image_folder(work / "data")).absolute()
        dep = Deployment(work, procs, data_dir, args.insecure, args.app)
        if args.insecure:
            dep.start_superlink()
            say(f"SuperLink INSECURE (no TLS, no node authentication) on {dep.address}")
            for name in SITES:
                dep.start_supernode(name, name)
            dep.wait_online_count(len(SITES))
        else:
            dep.make_credentials([*SITES, "site-b-2", "rogue"])
            dep.start_superlink()
            say(f"SuperLink (TLS, --enable-supernode-auth) on {dep.address}")
            for name in SITES:
                dep.register(name)
            ids = ", ".join(f"{k}={v}" for k, v in dep.node_ids.items())
            say(f"registered SuperNode keys: {ids}")
            for name in SITES:
                dep.start_supernode(name, name)
            for name in SITES:
                dep.wait_online(name)
        basic(dep, procs, args, report)
        if args.restart_rounds and not args.insecure:
            restart(dep, procs, args, report)
        if args.kill_rounds:
            killed_mid_round(dep, procs, args, report)
        for name in [n for n in procs.procs if n.startswith("supernode")]:
            procs.stop(name)
        procs.stop("superlink")
        if not args.no_simulation:
            simulation(dep, args, report)
        ok = True
    except (Failure, subprocess.SubprocessError) as err:
        print(f"\nDEPLOY TEST FAILED: {err}\nlogs: {work / 'logs'}", file=sys.stderr)
        errors = [
            line
            for line in Deployment.read(work / "logs" / "superlink.log").splitlines()
            if "ERROR" in line and "public key" not in line  # not the refused node
        ]
        if errors:
            print("SuperLink errors:\n" + "\n".join(errors[-5:]), file=sys.stderr)
    finally:
        procs.stop_all()
    report["ok"] = ok
    report["total_seconds"] = time.perf_counter() - t_start
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    if ok and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def print_summary(report: dict) -> None:
    say(f"report: {report['workdir']}/report.json")
    d, s = report.get("deployment"), report.get("simulation")
    if d:
        say(
            f"deployment: {d['wall_seconds']:.1f} s wall for {d['rounds']} rounds, "
            f"{d['seconds_per_round']:.1f} s/round (server-measured), "
            f"{d['wall_seconds_per_round']:.1f} s/round (wall incl. start-up)"
        )
    if s:
        say(
            f"simulation: {s['wall_seconds']:.1f} s wall, "
            f"{s['seconds_per_round']:.1f} s/round (server-measured), "
            f"{s['wall_seconds_per_round']:.1f} s/round (wall incl. start-up)"
        )
    say(f"{'PASSED' if report['ok'] else 'FAILED'} in {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
