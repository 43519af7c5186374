"""The local MLflow tracking server of a work directory: started on demand under a detached supervisor,
shared by parallel runs through leases, stopped when idle (see the package docstring)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import requests

from shortcut import record as record_lib

DEFAULT_IDLE_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0
HEALTH_WAIT_S = 20.0  # how long a live supervisor's server may take to answer before it counts as hung
STOP_GRACE_S = 5.0  # how long a stopping server gets after SIGTERM before its process group is SIGKILLed


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
        stderr_line(f"tracking: warning: SHORTCUT_TRACKING_IDLE_S={text!r} is not a number of seconds >= 0; "
                f"using {DEFAULT_IDLE_TIMEOUT_S:.0f}")
        return DEFAULT_IDLE_TIMEOUT_S
    return value


class LocalServer:
    """The framework's own MLflow server for one work directory (see module docstring).

    ``acquire()`` starts it or reuses a live one and takes a lease; ``release()`` drops the lease (the
    supervisor stops the server once no live lease is left for ``idle_timeout`` seconds, unless kept);
    ``stop()`` stops it now.
    """

    def __init__(self, state_dir: str | Path, *, idle_timeout: float | None = None, log: Callable = stderr_line):
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
                record_lib.write_json(self.state_file, state)
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
        # The launcher forks the supervisor off and exits at once (see supervise): the supervisor is
        # nobody's child, so neither a killed starter nor a Ray worker's exit takes it down.
        launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=Path(__file__).resolve().parents[2])
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
        record_lib.write_json(self.state_file, state)
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


def supervise(state_dir: Path, port: int, idle_timeout: float) -> int:
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
    stop = {"supervisor": me, "port": port, "idle_timeout_s": idle_timeout, "last_lease_ended": None}
    child = None
    try:
        inode = state_dir.stat().st_ino
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
               "--artifacts-destination", str(state_dir / "artifacts")]
        # No job-execution runner (GenAI jobs, unused here): fewer processes, and nothing but the server's
        # own worker touches the SQLite file.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, preexec_fn=lambda: _die_with(me))
        record_lib.write_json(state_dir / "supervisor.json", {"pid": me, "server_pid": child.pid, "port": port})
        idle_since = None
        stop["reason"] = "server exited"
        while not stopping and child.poll() is None:
            time.sleep(1.0)
            if not _same_dir(state_dir, inode):
                print(f"tracking supervisor: {state_dir} was deleted; stopping", flush=True)
                stop["reason"] = "store deleted"
                break
            if _in_use(state_dir):
                idle_since = stop["last_lease_ended"] = None
            elif idle_since is None:
                idle_since, stop["last_lease_ended"] = time.monotonic(), time.time()
            elif time.monotonic() - idle_since > idle_timeout and _withdraw_if_idle(state_dir, me):
                print(f"tracking supervisor: no run has used the server for {idle_timeout:.0f}s; stopping",
                      flush=True)
                stop["reason"] = "idle"
                break
        if stopping:
            stop["reason"] = stopping[0]
    finally:
        stop["stop_started"] = time.time()
        _stop_own_group(state_dir, me, stop, wrapper=child.pid if child else None)
    return 0


STOPS_FILE = "stops.jsonl"  # beside server.json: one line per stopped server, see _log_stop


def _log_stop(state_dir: Path, stop: dict) -> None:
    """Append one line to STOPS_FILE: why the server stopped, when the supervisor saw its last lease end
    (None: a lease was still held), when it began to stop and when the server's processes were gone
    (`server_exited`, or `killed` when they needed SIGKILL). Wall-clock seconds; the gaps tell a slow
    stop from a missed one."""
    with contextlib.suppress(OSError):
        with open(state_dir / STOPS_FILE, "a") as f:
            f.write(json.dumps(stop) + "\n")


def _stop_own_group(state_dir: Path, me: int, stop: dict, wrapper: int | None = None) -> None:
    """Stop every process of this supervisor's group (the mlflow CLI, uvicorn, whatever they forked):
    SIGTERM to the group, up to STOP_GRACE_S for them to exit, then SIGKILL to the group, which ends this
    process too. killpg reaches every member at once, a child forked a moment ago included.

    The `mlflow server` CLI (`wrapper`) only forwards the signal to uvicorn and waits for it; once uvicorn
    is gone the CLI spends seconds more tearing its interpreter down (a busy process, longer on a loaded
    machine), which made every stop wait out the whole grace and end in SIGKILL. So the grace waits for
    the processes that serve, not for the wrapper; SIGKILL then ends the group at once."""
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
    while (serving := [p for p in others() if p != wrapper]) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads((state_dir / "server.json").read_text()).get("pid") == me:
            (state_dir / "server.json").unlink()
    _log_stop(state_dir, {**stop, "killed" if serving else "server_exited": time.time()})
    if not others():
        return
    if serving:
        print(f"tracking supervisor: the server did not stop within {STOP_GRACE_S:.0f}s; killing it", flush=True)
    sys.stdout.flush()
    os.killpg(group, signal.SIGKILL)
