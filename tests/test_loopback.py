"""A local run listens on 127.0.0.1 only: every listening socket of every process a `run_experiment` on a
local Ray instance starts (the driver, Ray's GCS, raylet, workers and agents, the detached MLflow
supervisor and server) is on a loopback address (orchestration/execution/cluster.py, `local_only`)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.steps=2", "train.checkpoint_every=2", "eval.steps=[1]"]

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("processes")]  # xdist group: see conftest.py


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _ours(root: int, mark: str, seen: set[int]) -> list[psutil.Process]:
    """The driver, its descendants and the processes carrying `mark` in their environment (the tracking
    supervisor and server detach themselves); `seen` keeps every pid met, for the report."""
    procs = []
    with_mark = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SHORTCUT_PORT_PROBE") == mark:
                with_mark.append(proc)
        except psutil.Error:
            continue
    try:
        driver = psutil.Process(root)
        procs = [driver, *driver.children(recursive=True)]
    except psutil.Error:
        pass
    for proc in with_mark:
        try:
            procs += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    seen.update(p.pid for p in procs)
    return procs


def listening_sockets(root: int, mark: str, seen: set[int]) -> dict[tuple, str]:
    """(pid, ip, port, kind) -> process name of every TCP listening socket and unconnected UDP socket."""
    found = {}
    for proc in _ours(root, mark, seen):
        try:
            name = " ".join(proc.cmdline())[:100] or proc.name()
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # 2: SOCK_DGRAM
                    found[(proc.pid, c.laddr.ip, c.laddr.port, "tcp" if c.type == 1 else "udp")] = name
        except psutil.Error:
            continue
    return found


def test_a_local_run_listens_on_loopback_only(tmp_path):
    mark = uuid.uuid4().hex
    env = dict(os.environ, SHORTCUT_TRACKING="on", SHORTCUT_PORT_PROBE=mark)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "orchestration.run_experiment", "digits_flow", "--smoke", "--workdir",
           str(tmp_path / "runs"), "--cpus", "2", *[a for s in TINY for a in ("--set", s)]]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sockets, seen = {}, set()
    try:
        while driver.poll() is None:
            sockets.update(listening_sockets(driver.pid, mark, seen))
            time.sleep(0.2)
        out = driver.stdout.read()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    names = " ".join(sockets.values())
    # the sampling saw the servers a run starts (so this test can fail): Ray's core and the MLflow server
    assert all(n in names for n in ("gcs_server", "raylet", "uvicorn")), sockets
    exposed = {k: v for k, v in sockets.items() if not _loopback(k[1])}
    assert not exposed, "listening beyond loopback:\n" + "\n".join(
        f"{kind} {ip}:{port} pid {pid} {name}" for (pid, ip, port, kind), name in sorted(exposed.items()))
