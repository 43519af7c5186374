"""Test-session defaults: tests never start the framework's MLflow server or write into the repository's
results/ unless they ask to (tests of tracking and tables pass their own URIs and folders), and a server
a test starts without its own idle timeout stops 5 s after its last user.

The session fails if an MLflow server, a tracking supervisor or a Ray process that the tests started is
still alive at the end (after a grace period for the idle timeouts): every process the tests start
inherits $SHORTCUT_TEST_SESSION, which tells them apart from other sessions' and users' processes.

`make test` runs the tests on two pytest-xdist workers (`--dist loadgroup`): half of a serial run left one of
CI's two cores idle. Tests that start Ray, MLflow servers or processes they kill and time carry
`pytest.mark.xdist_group("processes")`: they run on one worker, one at a time, as they did serially, so two
Ray clusters or two timed kills never overlap. Tests sharing a module-scoped fixture stay together
(`pytest_collection_modifyitems`); the rest are shared out one by one. Each worker is its own session here
(its own mark, results folder and leftover check)."""

import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest

SESSION_VAR = "SHORTCUT_TEST_SESSION"
_LEFTOVER = re.compile(r"orchestration\.tracking\x00_supervise|mlflow|uvicorn|raylet|gcs_server|ray::|"
                       r"default_worker\.py|site-packages/ray/")


_RESULTS_DIR: list[str] = []  # the results folder this session made (removed at its end)


_OWN_RESULTS = "SHORTCUT_TEST_RESULTS_DIR"  # set beside SHORTCUT_RESULTS_DIR when a test session chose it


def pytest_configure(config):
    os.environ.setdefault("SHORTCUT_TRACKING", "off")
    if not os.environ.get("RAY_ADDRESS"):  # before any test imports ray: local Ray instances on loopback only
        from orchestration.execution.cluster import local_only

        local_only()
    # A folder of the user's is kept; one that a session made is replaced in each xdist worker by the
    # worker's own, so that two workers never export into one folder.
    if "SHORTCUT_RESULTS_DIR" not in os.environ or os.environ.get(_OWN_RESULTS):
        _RESULTS_DIR.append(tempfile.mkdtemp(prefix="shortcut_test_results_"))
        os.environ["SHORTCUT_RESULTS_DIR"] = os.environ[_OWN_RESULTS] = _RESULTS_DIR[0]
    os.environ.setdefault("SHORTCUT_TRACKING_IDLE_S", "5")
    os.environ[SESSION_VAR] = uuid.uuid4().hex


def _ours(mark: str, exclude: set[int]) -> dict[int, str]:
    """pid -> command line of the live MLflow / supervisor / Ray processes carrying this session's mark."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in exclude:
            continue
        try:
            if f"{SESSION_VAR}={mark}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except (OSError, IndexError):
            continue
        if _LEFTOVER.search(cmd):
            found[int(proc.name)] = cmd.replace("\0", " ").strip()
    return found


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """Fails the session if a server, supervisor or Ray process started by the tests outlives them."""
    if not Path("/proc/self/environ").exists():  # not Linux: nothing to check with
        yield
        return
    mark = os.environ[SESSION_VAR]
    exclude = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}  # alive before the tests
    yield
    grace = float(os.environ.get("SHORTCUT_TRACKING_IDLE_S") or 60) + 30
    deadline = time.monotonic() + grace
    while (left := _ours(mark, exclude)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"{len(left)} process(es) started by the tests were still running {grace:.0f}s after the "
                    "last test (now killed): " + "; ".join(f"{pid}: {cmd[:160]}" for pid, cmd in left.items()),
                    pytrace=False)


def pytest_unconfigure(config):
    for folder in _RESULTS_DIR:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Under xdist, the tests that share a module- or session-scoped fixture of their own module run on one
    worker, which builds it once (a test with its own xdist_group keeps that)."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        module = item.nodeid.split("::")[0]
        info = getattr(item, "_fixtureinfo", None)
        if info and any(d.scope != "function" and d.baseid == module
                        for defs in info.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(module))
