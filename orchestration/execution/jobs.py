"""Submit `run_experiment` to an existing Ray cluster through the Ray Jobs API, and follow it.

An address `http(s)://host:port` is a Ray dashboard (e.g. `http://127.0.0.1:8265` after `ray start --head`):
the experiment becomes a Ray job whose driver runs `python -m orchestration.run_experiment ARGV` on the
cluster, in a copy of this checkout (uncommitted changes included) uploaded as the job's working
directory. A bare GCS address (`host:6379`, `auto`) is not a job address: the driver connects with ray.init.

The job's `python` is the first `python` on the PATH of the cluster's Ray processes (the environment
`ray start` ran in), so it must have the project's dependencies installed: only the code travels, not
the virtualenv. Nor does the submitting shell's environment, except the SHORTCUT_* variables and
MLFLOW_TRACKING_URI, which are forwarded; pass anything else the job needs as `env_vars`.

The job runs in the cluster's temporary copy of the checkout, which goes away with the job, so
run_experiment gives it `--workdir ~/shortcut-models/runs` and `--results-dir ~/shortcut-models/results`
(on the head node) unless they are given; give them on shared storage for a multi-node cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from shortcut.errors import ShortcutError
from shortcut.record import git_commit

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parents[2]

# Kept out of the working_dir upload (gitignore syntax, relative to the repository root; Ray also honours
# .gitignore). Ray refuses a package of 512 MiB or more (its gRPC message limit) and warns from 256 MiB.
EXCLUDES = [
    ".git", ".venv", "venv", "/runs", "/build", "/tfds_data", "/mlruns", "/results/runs", "/results/figures",
    "**/__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
]
CONNECT_TIMEOUT_S = 5.0  # the SDK's own requests have no timeout: a silent host would hang it
STOP_TIMEOUT_S = 60.0
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


class JobSubmissionError(ShortcutError, RuntimeError):
    """A job could not be submitted or followed; the message is one line for the user."""


def is_job_address(address: str | None) -> bool:
    """True for a Ray dashboard URL (http:// or https://), which means: submit a Ray job."""
    return bool(address) and address.strip().lower().startswith(("http://", "https://"))


def connect(address: str) -> JobSubmissionClient:
    """A Jobs API client for the dashboard at `address`; JobSubmissionError when none answers.

    A cluster with token authentication (Ray's default for a local cluster once ~/.ray/auth_token exists)
    gets the token Ray's own tools would use: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token.
    """
    import requests

    from ray.job_submission import JobSubmissionClient

    address = address.strip().rstrip("/")
    hint = "start one with `ray start --head` or check --address"

    def get(endpoint: str, headers: dict | None = None):
        try:  # with a timeout (the SDK has none), so that a wrong address fails fast with a clear message
            return requests.get(f"{address}{endpoint}", headers=headers, timeout=CONNECT_TIMEOUT_S)
        except requests.RequestException as e:
            raise JobSubmissionError(f"no Ray dashboard answers at {address}: {_reason(e)}; {hint}") from None

    headers = {}
    if _json(get("/api/authentication_mode")).get("authentication_mode") == "token":  # public endpoint
        if not (token := _auth_token()):
            raise JobSubmissionError(f"the Ray cluster at {address} requires an authentication token: set "
                                     "RAY_AUTH_TOKEN (`ray get-auth-token` on its head node prints it), or "
                                     "RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token")
        headers["Authorization"] = f"Bearer {token}"
    r = get("/api/version", headers)
    if r.status_code in (401, 403):
        raise JobSubmissionError(f"the Ray cluster at {address} refused the authentication token (HTTP "
                                 f"{r.status_code}); check RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    if r.status_code != 200 or "ray_version" not in _json(r):
        raise JobSubmissionError(f"{address} answers, but not as a Ray dashboard (HTTP {r.status_code}); {hint}")
    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as e:  # noqa: BLE001 - the SDK's own checks (versions, authentication)
        raise JobSubmissionError(f"Ray dashboard at {address}: {_one_line(e)}") from None


def submit(argv: list[str], address: str, *, working_dir: Path = REPO_ROOT, env_vars: dict[str, str] | None = None,
           submission_id: str | None = None, out: TextIO | None = None,
           name: str | None = None) -> tuple[JobSubmissionClient, str]:
    """Submit `python -m orchestration.run_experiment ARGV` as a Ray job running in a copy of `working_dir`.

    The cluster's `python` must have the project's dependencies (see the module docstring). The job's
    environment from this side: this process's SHORTCUT_* and MLFLOW_TRACKING_URI, updated with `env_vars`
    (visible to anyone who can read the cluster's job list: no secrets). Returns the client and the job's
    submission id, by default `shortcut-<spec>-<timestamp>-<4 hex>`; `name` is the spec's (default: the
    first argument that is not an option).
    """
    client = connect(address)
    name = Path(name or next((a for a in argv if not a.startswith("-")), "run")).stem
    submission_id = submission_id or (f"shortcut-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-"
                                      f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
    job_env = {k: v for k, v in os.environ.items() if k.startswith("SHORTCUT_") or k == "MLFLOW_TRACKING_URI"}
    job_env["SHORTCUT_GIT_COMMIT"] = git_commit(working_dir)  # the uploaded copy has no .git
    job_env.update({k: str(v) for k, v in (env_vars or {}).items()})
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    if job_env:
        runtime_env["env_vars"] = job_env
    metadata = {"spec": name, "argv": shlex.join(argv), "git_commit": job_env["SHORTCUT_GIT_COMMIT"]}
    try:
        with _quiet_ray_sdk():
            job_id = client.submit_job(entrypoint=shlex.join(["python", "-m", "orchestration.run_experiment", *argv]),
                                       runtime_env=runtime_env, metadata=metadata, submission_id=submission_id)
    except Exception as e:  # noqa: BLE001 - package too large, id taken, upload failed
        raise JobSubmissionError(f"Ray job not submitted to {client.get_address()}: {_one_line(e)}") from None
    print(f"submitted Ray job {job_id} to {client.get_address()}", file=out or sys.stdout, flush=True)
    return client, job_id


def follow(client: JobSubmissionClient, job_id: str, *, out: TextIO | None = None,
           stop_prompt: Callable[[str], bool | None] | None = None) -> int:
    """Stream the job's logs into `out` until it ends; return 0 (succeeded), 1 (failed) or 130 (stopped).

    On Ctrl-C, `stop_prompt(question)` decides (default: ask on the terminal; None when stdin is not
    one): True stops the job and returns 130; False leaves it running and returns 0; None leaves it
    running and returns 130. Whenever the job is left running, the commands to follow or stop it are
    printed.
    """
    out = out or sys.stdout
    try:
        try:
            with _quiet_ray_sdk():
                asyncio.run(_stream_logs(client, job_id, out))
        except Exception as e:  # noqa: BLE001 - the log stream broke (cluster gone, network): the status decides
            print(f"\n[log stream of Ray job {job_id} lost: {_one_line(e)}]", file=out, flush=True)
        info = _wait_until_terminal(client, job_id, timeout=None)
    except KeyboardInterrupt:
        return _interrupted(client, job_id, out, stop_prompt or _ask_on_terminal)
    status = str(info.status)
    if status == "FAILED":
        code = f" (driver exit code {info.driver_exit_code})" if info.driver_exit_code is not None else ""
        message = re.split(r",? last available logs", info.message or "")[0]  # not the logs streamed above
        print(f"Ray job {job_id} failed{code}: {message}", file=out, flush=True)
    else:
        print(f"Ray job {job_id} {status.lower()}", file=out, flush=True)
    return EXIT_CODES.get(status, 1)


def submit_and_follow(argv: list[str], address: str, *, out: TextIO | None = None,
                      stop_prompt: Callable[[str], bool | None] | None = None, **submit_kwargs) -> int:
    """Submit the experiment as a Ray job (see `submit`) and follow it to its end (see `follow`)."""
    client, job_id = submit(argv, address, out=out, **submit_kwargs)
    return follow(client, job_id, out=out, stop_prompt=stop_prompt)


async def _stream_logs(client, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


@contextmanager
def _quiet_ray_sdk():
    """Mute the SDK's per-upload INFO lines and its notice that .git/.venv are excluded by default; keep
    its warnings (e.g. a package near the size limit)."""
    levels = {"ray.dashboard.modules.dashboard_sdk": logging.WARNING, "ray.dashboard.modules.job.sdk": logging.WARNING,
              "ray._private.runtime_env.packaging": logging.WARNING,
              "ray._private.runtime_env.working_dir": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _wait_until_terminal(client, job_id: str, timeout: float | None):
    """The job's final JobInfo; None if it is still not terminal after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            info = client.get_job_info(job_id)
        except Exception as e:  # noqa: BLE001 - the dashboard went away: say so in one line
            raise JobSubmissionError(f"lost the Ray dashboard while waiting for job {job_id}: {_one_line(e)}") from None
        if info.status.is_terminal():
            return info
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def _interrupted(client, job_id: str, out: TextIO, stop_prompt: Callable[[str], bool | None]) -> int:
    address = client.get_address()
    try:
        stop = stop_prompt(f"stop Ray job {job_id}? [y/N] ")
    except (KeyboardInterrupt, EOFError):
        stop = None
    if stop:
        try:
            client.stop_job(job_id)
            info = _wait_until_terminal(client, job_id, timeout=STOP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            print(f"\ncould not stop Ray job {job_id}: {_one_line(e)}", file=out, flush=True)
            info = None
        print(f"Ray job {job_id}: {info.status if info else 'not stopped yet'}", file=out, flush=True)
        return 130
    print(f"\nRay job {job_id} keeps running.\n  follow it: ray job logs --address {address} --follow {job_id}\n"
          f"  stop it:   ray job stop --address {address} {job_id}", file=out, flush=True)
    return 0 if stop is False else 130


def _ask_on_terminal(question: str) -> bool | None:
    """y/N on the terminal; None when stdin is not a terminal (no one to ask)."""
    if not sys.stdin or not sys.stdin.isatty():
        return None
    return input(f"\n{question}").strip().lower() in ("y", "yes")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _json(response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _auth_token() -> str | None:
    """The cluster token, found where Ray looks for it; None if none is set."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _reason(e: Exception) -> str:
    """The short cause of a requests failure, e.g. `Connection refused`, not urllib3's nested repr."""
    import requests

    if isinstance(e, requests.Timeout):
        return f"no answer within {CONNECT_TIMEOUT_S:g}s"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))
    return m.group(1).strip() if m else type(e).__name__
