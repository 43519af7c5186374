"""MLflow tracking: one MLflow run per experiment run, through one tracking server.

Naming
    experiment  ``shortcut-<dataset>`` (``data.dataset`` of the resolved spec, e.g. ``shortcut-digits``,
                ``shortcut-celebahq256``); ``--smoke`` runs (mock data) go to ``shortcut-<dataset>-smoke``.
    run         ``<spec name>-<spec hash[:8]>``; one MLflow run per run directory. Its id is kept in
                ``<run dir>/mlflow_run.json``, so a resumed run continues the same MLflow run.
    params      the flattened resolved spec (``model.depth``, ``optimizer.lr``, ...).
    metrics     ``loss``, ``loss_<group>`` (``loss_flow``, ``loss_bootstrap``), ``grad_norm``, ``lr``,
                ``steps_per_sec`` at their training step; every evaluation as ``<metric>/<N>_steps``
                (e.g. ``fd_digits/1_steps``, ``fid/128_steps``; ``fid/128_steps_w1.5`` where N is evaluated at
                several guidance scales) and ``class_accuracy/<N>_steps`` at the
                training step it was evaluated at; ``num_params``.
    tags        ``spec_name``, ``spec_hash``, ``method``, ``dataset``, ``seed``, ``arch``, ``smoke``,
                ``git_commit`` (also ``mlflow.source.git.commit``), ``run_dir``, ``record_status``.
    artifacts   ``spec.yaml`` (resolved spec), ``run.json`` (the run record), ``evaluation.json`` (every
                metric value with its provenance), ``samples/steps_<N>.png`` (grids) and ``export/``
                (the small results record that ``make_tables --tracking-uri`` reads).

The run record (``run.json``) stays the source of truth. Tracking never stops training: a server
that cannot be reached is reported in one warning line, the run goes on, and at the end the whole
record is synced (idempotently: points already logged are skipped), or the tracker says it could not
and how to sync later (``shortcut_tracking sync RUN_DIR``).

The local server (used unless ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` names one)
    ``<workdir>/mlflow/`` holds ``mlflow.db`` (SQLite), ``artifacts/``, ``server.json`` (URI, port, pid),
    ``server.log``, ``leases/`` and a lock file. The first run that needs it starts ``mlflow server`` on
    127.0.0.1 on a free port, under a small supervisor process; later and parallel runs reuse it (the
    lock makes start-or-reuse atomic, so parallel runs never start two). Each process using the
    server holds a lease: a file in ``leases/`` it keeps flock-ed, so the kernel ends the lease when the
    process ends, however it ends (a lease is never judged by a process id, which the kernel hands out
    again). The supervisor stops the server once no lease has been held for ``idle_timeout`` seconds
    (60 by default), or at once when the store's directory is deleted, so a killed run cannot leave it
    running forever; it decides under the store's lock and withdraws server.json first, so a run
    starting meanwhile never gets a server that is about to stop. Stopping is bounded: SIGTERM to the
    supervisor's whole process group, a few seconds' grace, then SIGKILL to the group (nothing the
    server forked late escapes). The supervisor is detached (nobody's child, its own session: Ray kills
    a worker's children when the worker exits), does not keep the scheduling of the process that
    started it (a Ray worker's nice 15, OOM-killer priority and single pinned core), and the server
    dies with it (PR_SET_PDEATHSIG); a server of the store found without a live supervisor is stopped
    before a new one starts, so a store has at most one server. A
    server started with ``keep`` (``run_experiment --keep-tracking-server`` or
    ``shortcut_tracking server start``) stays up until ``run_experiment --stop-tracking-server`` or
    ``shortcut_tracking server stop``. Every writer goes through the server; nothing but the server
    opens the SQLite file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import requests
import yaml

from orchestration.results import arch_label

RUN_ID_FILE = "mlflow_run.json"
DEFAULT_IDLE_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0
HEALTH_WAIT_S = 20.0  # how long a live supervisor's server may take to answer before it counts as hung
STOP_GRACE_S = 5.0  # how long a stopping server gets after SIGTERM before its process group is SIGKILLed
TRAIN_KEYS_SKIPPED = ("step",)
_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_MAX_PARAM_LENGTH = 6000


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ naming


def experiment_name(record: dict) -> str:
    """``shortcut-<dataset>``, with ``-smoke`` for mock-data runs (see module docstring)."""
    dataset = record["spec"]["data"]["dataset"]
    return f"shortcut-{dataset}" + ("-smoke" if record.get("smoke") else "")


def run_tags(record: dict) -> dict[str, str]:
    spec = record["spec"]
    tags = {
        "mlflow.runName": f"{record['name']}-{record['spec_hash'][:8]}",
        "spec_name": record["name"], "spec_hash": record["spec_hash"], "method": spec["method"]["name"],
        "dataset": spec["data"]["dataset"], "seed": str(spec.get("seed", 0)), "arch": arch_label(spec),
        "smoke": str(bool(record.get("smoke"))).lower(), "run_dir": str(Path(record["run_dir"]).resolve()),
        "record_status": str(record.get("status", "")),
    }
    if record.get("git_commit"):
        tags["git_commit"] = tags["mlflow.source.git.commit"] = str(record["git_commit"])
    if record.get("resumed_from") is not None:
        tags["resumed_from"] = str(record["resumed_from"])
    return tags


def run_params(record: dict) -> dict[str, str]:
    from shortcut.spec import flatten

    return {k: _param_value(v) for k, v in flatten(record["spec"]).items()}


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:_MAX_PARAM_LENGTH]


def train_points(metrics: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) for one training log line (finite numbers only)."""
    step = int(metrics["step"])
    return [(k, float(v), step) for k, v in metrics.items()
            if k not in TRAIN_KEYS_SKIPPED and isinstance(v, (int, float)) and math.isfinite(v)]


def evaluation_points(entries: Iterable[dict]) -> list[tuple[str, float, int]]:
    """(``<metric>/<setting>``, value, train_step) for evaluation entries, plus class accuracy; the setting
    is ``<N>_steps``, or ``<N>_steps_w<w>`` where a spec evaluates N steps at several guidance scales."""
    out = []
    for e in entries:
        setting, step = e.get("setting") or f"{int(e['num_steps'])}_steps", int(e["train_step"])
        if isinstance(e.get("value"), (int, float)) and math.isfinite(e["value"]):
            out.append((f"{e['metric']}/{setting}", float(e["value"]), step))
        if isinstance(e.get("class_accuracy"), (int, float)):
            out.append((f"class_accuracy/{setting}", float(e["class_accuracy"]), step))
    return out


# ------------------------------------------------------------------------------------ local server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(uri: str, timeout: float = 2.0) -> bool:
    """True if an MLflow server answers /health at ``uri`` (http(s) URIs only)."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def idle_timeout_from_env() -> float:
    """``$SHORTCUT_TRACKING_IDLE_S`` seconds, else 60; anything but a finite number >= 0 is ignored (one warning)."""
    text = os.environ.get("SHORTCUT_TRACKING_IDLE_S")
    if not text:
        return DEFAULT_IDLE_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        _stderr(f"tracking: warning: SHORTCUT_TRACKING_IDLE_S={text!r} is not a number of seconds >= 0; "
                f"using {DEFAULT_IDLE_TIMEOUT_S:.0f}")
        return DEFAULT_IDLE_TIMEOUT_S
    return value


class LocalServer:
    """The framework's own MLflow server for one work directory (see module docstring).

    ``acquire()`` starts it or reuses a live one and takes a lease; ``release()`` drops the lease (the
    supervisor stops the server once no live lease is left for ``idle_timeout`` seconds, unless kept);
    ``stop()`` stops it now.
    """

    def __init__(self, state_dir: str | Path, *, idle_timeout: float | None = None, log: Callable = _stderr):
        self.dir = Path(state_dir).resolve()
        self.idle_timeout = idle_timeout if idle_timeout is not None else idle_timeout_from_env()
        self.log = log
        self.lease: Path | None = None
        self._lease_file = None  # open while the lease is held: its flock is the lease

    @classmethod
    def for_workdir(cls, workdir: str | Path, **kwargs) -> "LocalServer":
        return cls(Path(workdir) / "mlflow", **kwargs)

    @property
    def state_file(self) -> Path:
        return self.dir / "server.json"

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def state(self) -> dict | None:
        """The server.json of a live, healthy server, else None. A live supervisor's server that is slow
        to answer (a loaded machine) gets HEALTH_WAIT_S before it counts as hung."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        deadline = time.monotonic() + HEALTH_WAIT_S
        while _pid_alive(int(state["pid"])):
            if healthy(state["uri"]):
                return state
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return None

    def acquire(self, *, keep: bool = False, port: int | None = None) -> str:
        """Start (or reuse) the server, take a lease; returns its URI."""
        with self._locked():
            state = self.state()
            if state is None:
                self._stop_strays()  # a hung server, or one left by an older version: one store, one server
                state = self._start(port)
            if keep and not state.get("keep"):
                state["keep"] = True
                _write_json(self.state_file, state)
            if self.lease is None or not self.lease.exists():
                self.release()
                name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self.lease, self._lease_file = _take_lease(self.dir / "leases", name)
            return state["uri"]

    def release(self) -> None:
        if self.lease is not None:
            self.lease.unlink(missing_ok=True)
            self.lease = None
        lease_file, self._lease_file = getattr(self, "_lease_file", None), None
        if lease_file is not None:
            lease_file.close()  # the flock goes with it

    def _start(self, port: int | None) -> dict:
        leases = self.dir / "leases"
        leases.mkdir(exist_ok=True)
        for lease in leases.iterdir():  # leases of processes that are gone (no lock held on them)
            if not _lease_held(lease):
                lease.unlink(missing_ok=True)
        port = port or self._previous_port() or free_port()
        uri = f"http://127.0.0.1:{port}"
        # the lease that keeps the new server from idling out before acquire() records its own
        starting, starting_file = _take_lease(leases, f"{os.getpid()}-starting-{uuid.uuid4().hex[:8]}")
        supervisor_file = self.dir / "supervisor.json"
        supervisor_file.unlink(missing_ok=True)
        log_file = open(self.dir / "server.log", "ab")
        cmd = [sys.executable, "-m", "orchestration.tracking", "_supervise", "--state-dir", str(self.dir),
               "--port", str(port), "--idle-timeout", str(self.idle_timeout)]
        # The launcher forks the supervisor off and exits at once (see _supervise): the supervisor is
        # nobody's child, so neither a killed starter nor a Ray worker's exit takes it down.
        launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=Path(__file__).resolve().parents[1])
        log_file.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        supervisor: dict = {}
        try:
            while not (supervisor and healthy(uri, timeout=1.0)):
                with contextlib.suppress(OSError, ValueError):
                    supervisor = supervisor or json.loads(supervisor_file.read_text())
                gone = (not _pid_alive(supervisor["pid"])) if supervisor else launcher.poll() not in (None, 0)
                if gone:
                    raise RuntimeError(f"the MLflow server exited before answering; see {self.dir / 'server.log'}")
                if time.monotonic() > deadline:
                    if supervisor:
                        _kill_group(supervisor["pid"])
                    elif launcher.poll() is None:  # it has not forked the supervisor yet: it would, after we left
                        _kill_group(launcher.pid)
                    self._stop_strays()  # a supervisor it forked meanwhile (found by its command line)
                    raise RuntimeError(f"the MLflow server did not answer within {START_TIMEOUT_S:.0f}s; "
                                       f"see {self.dir / 'server.log'}")
                time.sleep(0.25)
        finally:
            starting.unlink(missing_ok=True)
            starting_file.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(5)
        state = {"uri": uri, "port": port, "pid": supervisor["pid"], "server_pid": supervisor["server_pid"],
                 "started": time.time(), "keep": False, "backend_store_uri": f"sqlite:///{self.dir / 'mlflow.db'}",
                 "artifacts_destination": str(self.dir / "artifacts"), "idle_timeout_s": self.idle_timeout}
        _write_json(self.state_file, state)
        (self.dir / "last_port").write_text(str(port))
        self.log(f"tracking: started an MLflow server at {uri} (store {self.dir}; it stops "
                 f"{self.idle_timeout:.0f}s after the last run using it ends)")
        return state

    def _previous_port(self) -> int | None:
        """The port this store's server last used, if it is free: a restarted server keeps its URI."""
        try:
            port = int(json.loads((self.dir / "last_port").read_text()))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
            return port
        except (OSError, ValueError):
            return None

    def _stray_groups(self) -> list[int]:
        """Process groups of this store's supervisors and servers (its uvicorn worker shares the group)."""
        store, own = f"sqlite:///{self.dir / 'mlflow.db'}", os.getpgid(0)
        groups = set()
        for pid in _pids():
            cmd = _cmdline(pid)
            if store in cmd or ("_supervise" in cmd and str(self.dir) in cmd):
                with contextlib.suppress(OSError):
                    groups.add(os.getpgid(pid))
        return sorted(groups - {own})

    def _stop_strays(self) -> bool:
        groups = self._stray_groups()
        for pgid in groups:
            self.log(f"tracking: stopping a tracking server of {self.dir} that no supervisor looks after "
                     f"(process group {pgid})")
            _kill_group(pgid)
        return bool(groups)

    def stop(self) -> bool:
        """Stop the server now (whoever started it); True if one was running."""
        with self._locked():
            running = False
            with contextlib.suppress(OSError, ValueError):
                pid = int(json.loads(self.state_file.read_text())["pid"])
                if _pid_alive(pid):
                    _kill_group(pid)
                    running = True
            self.state_file.unlink(missing_ok=True)
            return self._stop_strays() or running


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _kill_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group `pgid` (a supervisor's), SIGKILL whatever lingers; waits until it is empty."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-pgid, os.WNOHANG)
            if not _group_members(pgid):
                return
            time.sleep(0.1)


def _group_members(pgid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(stat.parent.name))
    return out


_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    """Linux prctl(2); a no-op elsewhere."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _die_with(parent: int) -> None:
    """preexec_fn of the server: it gets SIGTERM when its supervisor dies, however the supervisor dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _same_dir(path: Path, inode: int) -> bool:
    try:
        return path.stat().st_ino == inode
    except OSError:
        return False


def _take_lease(leases: Path, name: str):
    """(path, open file) of a new lease `leases/name`, flock-ed before it appears under its name, so the
    supervisor never sees it unlocked while its holder lives. The lease lasts while the file is open."""
    leases.mkdir(parents=True, exist_ok=True)
    tmp = leases / f".{name}.new"
    f = open(tmp, "w")  # not inherited by child processes (PEP 446): only this process holds it
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(f"{os.getpid()}\n")
    f.flush()
    os.replace(tmp, leases / name)
    return leases / name, f


def _lease_held(path: Path) -> bool:
    """Whether a process still holds the lease `path` (its flock). A lease file nobody locks is a leftover
    of a process that is gone, whatever process now has its pid."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the shared lock if we got it
    return False


def _in_use(state_dir: Path) -> bool:
    """A lease is held, or the server is kept (server.json says keep)."""
    leases = state_dir / "leases"
    if any(_lease_held(p) for p in (leases.iterdir() if leases.is_dir() else ()) if not p.name.startswith(".")):
        return True
    try:
        return bool(json.loads((state_dir / "server.json").read_text()).get("keep", False))
    except (OSError, ValueError, AttributeError):
        return False


def _withdraw_if_idle(state_dir: Path, me: int) -> bool:
    """Under the store's lock (as acquire() takes it): if still nobody uses the server, remove server.json
    (when it names this supervisor) and return True: from then on acquire() starts a new server instead of
    handing out this one, which is about to stop. False while a user holds the lock (decide next tick)."""
    with open(state_dir / "lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if _in_use(state_dir):
            return False
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads((state_dir / "server.json").read_text()).get("pid") == me:
                (state_dir / "server.json").unlink()
        return True


def _own_scheduling() -> None:
    """Drop the scheduling the starter passed on: a Ray worker runs at nice 15, first in line for the OOM
    killer (oom_score_adj 1000) and pinned to the one core cpu_slots gave its run, which goes to the next
    run when this one ends. The work directory's server outlives that run and serves the others: all
    cores, and nice / OOM priority back to normal where this process may lower them (best effort)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("0")


def _supervise(state_dir: Path, port: int, idle_timeout: float) -> int:
    """Run ``mlflow server`` on 127.0.0.1:port and stop it when no lease has been held for `idle_timeout`
    seconds, when `state_dir` is deleted, or on SIGTERM.

    Why it detaches: Ray kills a worker's child processes when the worker exits, and a starter may be
    SIGKILLed; a supervisor that is their child dies with them and leaves an unsupervised server behind
    (re-parented to init). So the launcher forks the supervisor off and exits; the supervisor leads its
    own session (out of reach of process-group kills); the server gets SIGTERM when the supervisor dies
    (PR_SET_PDEATHSIG) and forwards it to its uvicorn worker; anything the server orphans is re-parented
    to the supervisor (a child subreaper). However the loop ends (idle, SIGTERM, an error), the `finally`
    stops the whole process group: SIGTERM, STOP_GRACE_S, then SIGKILL to the group, this process last.
    """
    if os.fork():
        os._exit(0)
    os.setsid()
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _own_scheduling()
    stopping = []  # handlers first: a SIGTERM while the server starts still stops the group
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stopping.append("SIGINT"))
    me = os.getpid()
    try:
        inode = state_dir.stat().st_ino
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
               "--artifacts-destination", str(state_dir / "artifacts")]
        # No job-execution runner (GenAI jobs, unused here): fewer processes, and nothing but the server's
        # own worker touches the SQLite file.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, preexec_fn=lambda: _die_with(me))
        _write_json(state_dir / "supervisor.json", {"pid": me, "server_pid": child.pid, "port": port})
        idle_since = None
        while not stopping and child.poll() is None:
            time.sleep(1.0)
            if not _same_dir(state_dir, inode):
                print(f"tracking supervisor: {state_dir} was deleted; stopping", flush=True)
                break
            if _in_use(state_dir):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_timeout and _withdraw_if_idle(state_dir, me):
                print(f"tracking supervisor: no run has used the server for {idle_timeout:.0f}s; stopping",
                      flush=True)
                break
    finally:
        _stop_own_group(state_dir, me)
    return 0


def _stop_own_group(state_dir: Path, me: int) -> None:
    """Stop every process of this supervisor's group (the mlflow CLI, uvicorn, whatever they forked):
    SIGTERM to the group, up to STOP_GRACE_S for them to exit, then SIGKILL to the group, which ends this
    process too. killpg reaches every member at once, a child forked a moment ago included."""
    group = os.getpgid(0)

    def others() -> list[int]:
        with contextlib.suppress(ChildProcessError):  # reap our children and what was re-parented to us
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        return [pid for pid in _group_members(group) if pid != me]

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while others() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads((state_dir / "server.json").read_text()).get("pid") == me:
            (state_dir / "server.json").unlink()
    if others():
        print(f"tracking supervisor: the server did not stop within {STOP_GRACE_S:.0f}s; killing it", flush=True)
        sys.stdout.flush()
        os.killpg(group, signal.SIGKILL)


# ----------------------------------------------------------------------------------------- tracker


class Tracker:
    """Logs one experiment run into MLflow; every method is safe to call and never raises.

    ``start(record)`` at the start (creates or resumes the MLflow run, logs params, tags, spec),
    ``log_metrics(metrics)`` for each training log line (the dict ``train(on_log=...)`` passes),
    ``log_evaluation(entries)`` for evaluation entries, ``end(record)`` with the final record (syncs
    everything in it, uploads artifacts, sets the run status), ``close()`` drops the server lease.
    """

    def __init__(self, tracking_uri: str | None = None, *, server: LocalServer | None = None,
                 keep_server: bool = False, tags: dict[str, str] | None = None,
                 log: Callable[[str], None] = _stderr):
        if (tracking_uri is None) == (server is None):
            raise ValueError("give exactly one of tracking_uri and server")
        self.uri, self.server, self.keep_server, self._say = tracking_uri, server, keep_server, log
        self.tags = dict(tags or {})  # extra run tags, e.g. mlflow.parentRunId for a sweep's trial
        self.run_id: str | None = None
        self.offline = False
        self._warned = False
        self._client = None

    @classmethod
    def for_workdir(cls, workdir: str | Path, **kwargs) -> "Tracker":
        """A tracker that uses (starting if needed) the local server of `workdir`."""
        return cls(server=LocalServer.for_workdir(workdir), **kwargs)

    # -- hooks called by shortcut.run.run

    def fork(self) -> "Tracker":
        """A new tracker with the same destination, for another run (e.g. a teacher stage trained inside
        a run): one Tracker follows one run at a time."""
        if self.server is not None:
            return Tracker(server=LocalServer(self.server.dir, idle_timeout=self.server.idle_timeout,
                                              log=self.server.log), keep_server=self.keep_server, log=self._say)
        return Tracker(self.uri, log=self._say)

    def start(self, record: dict) -> None:
        self.run_id, self.offline, self._warned = None, False, False  # a tracker may follow runs one after another
        # a finished record handed over by the run that held its run directory (shortcut.run._replay): its
        # points are in MLflow already, end() syncs what is missing; no live logging (no duplicate points)
        self._replayed = record.get("status") != "running"
        try:
            if self.server is not None:  # start or reuse the local server, and hold a lease while the run lasts
                self.uri, self._client = self.server.acquire(keep=self.keep_server), None
            if not healthy(self.uri):
                raise ConnectionError("no answer from /health")
            self.run_id = ensure_run(self.client, record, self.tags)
            self._say(f"tracking: MLflow run {self.run_id} in experiment {experiment_name(record)} at {self.uri}")
        except Exception as e:  # noqa: BLE001 - tracking must never stop a run
            self._go_offline(e)

    def log_metrics(self, metrics: dict) -> None:
        """The `on_log` hook: one training log line."""
        self._live(train_points(metrics))

    def log_evaluation(self, entries: list[dict]) -> None:
        self._live(evaluation_points(entries))

    def end(self, record: dict) -> None:
        try:
            self._end(record)
        except Exception as e:  # noqa: BLE001
            self._say(f"tracking: warning: could not sync the run record to MLflow ({type(e).__name__}: {e}); "
                     f"run.json is complete; sync later with `shortcut_tracking sync {record.get('run_dir')}`")
        finally:
            self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.release()

    # -- internals

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def _go_offline(self, error: BaseException) -> None:
        self.offline = True
        if not self._warned:
            self._warned = True
            self._say(f"tracking: warning: MLflow at {self.uri or '(local server)'} unavailable "
                     f"({type(error).__name__}: {str(error)[:200]}); the run continues, run.json is the record, "
                     "and the tracker syncs it at the end if the server is back")

    def _live(self, points: list[tuple[str, float, int]]) -> None:
        if self.offline or self.run_id is None or not points or getattr(self, "_replayed", False):
            return
        try:
            if self.uri.startswith(("http://", "https://")):
                # plain REST with a short timeout and no retries: a dead server costs one failed request
                now = int(time.time() * 1000)
                body = {"run_id": self.run_id,
                        "metrics": [{"key": k, "value": v, "step": s, "timestamp": now} for k, v, s in points]}
                r = requests.post(f"{self.uri.rstrip('/')}/api/2.0/mlflow/runs/log-batch", json=body, timeout=10)
                r.raise_for_status()
            else:
                _log_points(self.client, self.run_id, points)
        except Exception as e:  # noqa: BLE001
            self._go_offline(e)

    def _end(self, record: dict) -> None:
        if self.server is not None and (self.uri is None or not healthy(self.uri)):
            self.server.release()  # our own server died or never started: start (or find) it again
            self.uri, self._client = self.server.acquire(keep=self.keep_server), None
        if not healthy(self.uri):
            self._say(f"tracking: warning: MLflow at {self.uri} still unavailable; not synced. run.json is complete; "
                     f"sync later with `shortcut_tracking sync {record['run_dir']}`")
            return
        self.run_id = sync_record(self.client, record, self.tags)
        if self.offline:
            self._say(f"tracking: the server is back; synced the whole run record into MLflow run {self.run_id}")


def disabled_by_env() -> bool:
    """$SHORTCUT_TRACKING=off (or 0, false, no) turns tracking off, like --no-tracking."""
    return os.environ.get("SHORTCUT_TRACKING", "").lower() in ("0", "off", "false", "no")


def make_tracker(*, workdir: str | Path, tracking_uri: str | None = None, enabled: bool = True,
                 keep_server: bool = False, tags: dict[str, str] | None = None,
                 log: Callable[[str], None] = _stderr) -> Tracker | None:
    """The CLI's tracker: `tracking_uri`, else $MLFLOW_TRACKING_URI, else the local server of `workdir`.
    None when disabled (`--no-tracking`, or $SHORTCUT_TRACKING=off)."""
    if not enabled or disabled_by_env():
        return None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Tracker(uri, tags=tags, log=log)
    return Tracker(server=LocalServer.for_workdir(workdir, log=log), keep_server=keep_server, tags=tags, log=log)


# ------------------------------------------------------------------------------------ sync / client


def get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={"created_by": "shortcut-models orchestration.tracking"})
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ensure_run(client, record: dict, extra_tags: dict[str, str] | None = None) -> str:
    """The MLflow run of this run directory: the one recorded in mlflow_run.json if the server knows it,
    else one found by its tags (spec hash + run dir), else a new one. Logs params and tags, marks it
    RUNNING, uploads the resolved spec, and records its id in the run directory."""
    from mlflow.entities import Param, RunTag

    rundir = Path(record["run_dir"])
    exp_id = get_or_create_experiment(client, experiment_name(record))
    _forget_artifact_repos()
    tags = {**run_tags(record), **(extra_tags or {})}
    run = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads((rundir / RUN_ID_FILE).read_text())["run_id"]
        with contextlib.suppress(Exception):
            run = client.get_run(known)
            if run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active":
                run = None
    if run is None:  # e.g. a run directory copied from elsewhere, or mlflow_run.json lost
        found = []
        with contextlib.suppress(Exception):
            found = client.search_runs([exp_id], filter_string=f"tags.spec_hash = '{record['spec_hash']}' and "
                                       f"tags.run_dir = '{tags['run_dir']}'", max_results=1)
        run = found[0] if found else client.create_run(exp_id, run_name=tags["mlflow.runName"])
    run_id = run.info.run_id
    if run.info.status != "RUNNING" and record.get("status") == "running":
        client.update_run(run_id, status="RUNNING")
    existing = dict(run.data.params)
    params = run_params(record)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])
    tags.update({f"param_changed.{k}": v[:5000] for k, v in changed.items()})  # params are immutable in MLflow
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(record["spec"], sort_keys=False))
        client.log_artifact(run_id, str(spec_file))
    _write_json(rundir / RUN_ID_FILE, {"run_id": run_id, "experiment_id": exp_id,
                                       "experiment": experiment_name(record), "tracking_uri": client.tracking_uri})
    return run_id


def _forget_artifact_repos() -> None:
    """MLflow caches artifact repositories per run id for the whole process, with the server address
    they were first resolved against; a server that came back on another address would then be
    missed. Drop the cache (best effort: it is MLflow-internal)."""
    with contextlib.suppress(Exception):
        from mlflow.tracking._tracking_service import utils as _utils

        _utils._artifact_repos_cache.clear()


def _log_points(client, run_id: str, points: list[tuple[str, float, int]], skip_existing: bool = False) -> int:
    from mlflow.entities import Metric

    if skip_existing:
        existing = {k: {(m.step, m.value) for m in client.get_metric_history(run_id, k)}
                    for k in {k for k, _, _ in points}}
        points = [(k, v, s) for k, v, s in points if not any(step == s and math.isclose(val, v, rel_tol=1e-9,
                                                                                        abs_tol=1e-12)
                                                             for step, val in existing[k])]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, s) for k, v, s in points]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    return len(metrics)


def record_points(record: dict) -> list[tuple[str, float, int]]:
    points = []
    for m in ((record.get("train") or {}).get("history") or []):
        points += train_points(m)
    points += evaluation_points(record.get("evaluation") or [])
    if record.get("num_params"):
        points.append(("num_params", float(record["num_params"]), 0))
    return points


def sync_record(client, record: dict, extra_tags: dict[str, str] | None = None) -> str:
    """Log a run record (run.json) into MLflow: create or continue its run, add the metric points not
    yet there, upload artifacts, set the final status. Idempotent."""
    run_id = ensure_run(client, record, extra_tags)
    _log_points(client, run_id, record_points(record), skip_existing=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str))
        client.log_artifact(run_id, str(tmp / "run.json"))
        if record.get("evaluation"):
            (tmp / "evaluation.json").write_text(json.dumps(record["evaluation"], indent=2, default=str))
            client.log_artifact(run_id, str(tmp / "evaluation.json"))
        for info in (record.get("samples") or {}).values():
            grid = Path(info.get("grid", ""))
            if grid.is_file():
                client.log_artifact(run_id, str(grid), "samples")
        if record.get("status") == "finished":
            from orchestration.results import export_record, write_export

            export_dir = tmp / "export"
            write_export(export_record(record), export_dir, flat=True)
            client.log_artifacts(run_id, str(export_dir), "export")
    status = _STATUS.get(record.get("status", ""))
    if status:
        client.set_terminated(run_id, status)
    return run_id


def sync(run_dir: str | Path, tracking_uri: str) -> str:
    """Log a finished (or failed) run directory's run.json into the MLflow server at `tracking_uri`."""
    from mlflow.tracking import MlflowClient

    record = json.loads((Path(run_dir) / "run.json").read_text())
    return sync_record(MlflowClient(tracking_uri), record)


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shortcut_tracking", description="The framework's MLflow tracking server "
                                "and after-the-fact syncing of run records.")
    sub = p.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("server", help="start / stop / show the local tracking server of a work directory")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--workdir", default="runs", help="work directory (default: runs/)")
    syn = sub.add_parser("sync", help="log run directories' run.json into MLflow (idempotent)")
    syn.add_argument("run_dirs", nargs="+", help="run directories (or work directories: every run.json below)")
    syn.add_argument("--tracking-uri", help="server URI (default: $MLFLOW_TRACKING_URI, else the local server "
                                           "of --workdir)")
    syn.add_argument("--workdir", default="runs")
    sup = sub.add_parser("_supervise", help=argparse.SUPPRESS)
    sup.add_argument("--state-dir", required=True)
    sup.add_argument("--port", type=int, required=True)
    sup.add_argument("--idle-timeout", type=float, required=True)
    args = p.parse_args(argv)

    if args.command == "_supervise":
        return _supervise(Path(args.state_dir), args.port, args.idle_timeout)
    if args.command == "server":
        server = LocalServer.for_workdir(args.workdir, log=print)
        if args.action == "start":
            uri = server.acquire(keep=True)
            server.release()
            print(f"MLflow server at {uri} (kept until `shortcut_tracking server stop --workdir {args.workdir}`)")
        elif args.action == "stop":
            print("stopped" if server.stop() else "no server was running")
        else:
            state = server.state()
            print(json.dumps(state, indent=2) if state else "no server running")
        return 0
    server = None
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        server = LocalServer.for_workdir(args.workdir, log=print)
        uri = server.acquire()
    try:
        failed = 0
        from orchestration.results import find_run_records

        for path in args.run_dirs:
            for f in find_run_records(path):
                try:
                    print(f"{f.parent}: MLflow run {sync(f.parent, uri)}")
                except Exception as e:  # noqa: BLE001
                    failed += 1
                    print(f"{f.parent}: not synced: {type(e).__name__}: {e}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        if server is not None:
            server.release()


if __name__ == "__main__":
    sys.exit(main())
