"""Progress: a bar with time left on a terminal, today's plain lines elsewhere (shortcut/progress.py); a table's
progress and its time left (orchestration/reporting/table_progress.py)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path
from types import SimpleNamespace

from orchestration.reporting import table_progress

REPO = Path(__file__).resolve().parents[1]

# The real training loop (shortcut.train.train, with its checkpoints and data prefetcher) over a stand-in step
# that takes 0.15 s, so a bar has frames to draw: 6 steps, a log line every 2.
TRAIN = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from shortcut.checkpoint import Checkpointer
    from shortcut.data import make_mock_iterator
    from shortcut.spec_files import load_spec
    from shortcut.train import TrainState, train

    spec = load_spec("digits_shortcut", ["train.steps=6", "train.log_every=2"])
    w = {"w": jnp.zeros(2)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=w, ema_params=w, opt_state=(), rng=jax.random.PRNGKey(0))

    def step(state, batch):
        time.sleep(0.15)
        return state.replace(step=state.step + 1), {"loss": jnp.float32(0.25), "grad_norm": jnp.float32(1.0),
                                                    "lr": jnp.float32(1e-4)}

    data = make_mock_iterator(image_shape=spec.pixel_shape, num_classes=10, batch_size=2, seed=0)
    train(spec, state, step, data, Checkpointer(sys.argv[1], keep=1))
    print("done")
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SHORTCUT_PROGRESS")}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def test_training_shows_a_bar_with_time_left_on_a_terminal(tmp_path):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has no size
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(tmp_path / "ckpt")], cwd=REPO, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(primary)
    text = out.decode(errors="replace")
    assert proc.returncode == 0 and "done" in text, text[-2000:]
    frames = [f for f in re.split(r"[\r\n]", text) if "digits_shortcut train" in f]
    # a frame such as 'digits_shortcut train:  67%|██████▋   | 4/6 [00:00<00:00,  6.52step/s, loss 0.2500]'
    assert any(re.search(r"\d/6 \[\d\d:\d\d<\d\d:\d\d, .*step/s, loss 0\.2500\]", f) for f in frames), frames
    assert "step 2/6 grad_norm" not in text  # the bar stands in for the plain lines


def test_training_logs_plain_lines_into_a_pipe(tmp_path):
    done = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / "ckpt")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    # today's plain lines at today's cadence (log_every), nothing a terminal would redraw
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], done.stdout
    assert re.fullmatch(r"step 2/6 grad_norm 1 loss 0\.25 steps_per_sec [\d.]+", lines[0]), lines[0]
    assert "\r" not in done.stdout + done.stderr and "step/s" not in done.stderr


def _node(name: str, status: str, started=None, ended=None):
    return SimpleNamespace(spec=SimpleNamespace(name=name), label=f"{name} [abcd1234]", status=status,
                           started=started, ended=ended)


def test_a_tables_time_left_comes_from_its_finished_and_running_runs():
    nodes = {"a": _node("flow", "finished", 0.0, 100.0), "b": _node("shortcut", "running", 100.0),
             "c": _node("reflow", "waiting"), "d": _node("meanflow", "waiting"), "e": _node("cd", "cached")}
    running = ["b"]
    board = {"b": {"started": 100.0, "step": 250, "total": 1000}}
    # the running run: 50 s for 250 steps, 150 s to go; two waiting runs at the finished run's 100 s; one at a time
    assert table_progress.eta_seconds(nodes, running, board, now=150.0) == 150.0 + 2 * 100.0
    line = table_progress.line(nodes, running, board)
    assert line.startswith("2/5 finished, 1 running, 2 waiting; time left ") and "running: shortcut 250/1000" in line
    nothing_yet = {"b": _node("shortcut", "running", 100.0), "c": _node("reflow", "waiting")}
    assert table_progress.eta_seconds(nothing_yet, running, {}, now=150.0) is None  # no rate to go by yet
    # nothing finished, but the running run has a rate: its projected run time stands in for the waiting one
    assert table_progress.eta_seconds(nothing_yet, running, board, now=150.0) == 150.0 + 200.0
    message = table_progress.interrupted(nodes, running)
    assert "kept 2 finished run(s)" in message and "shortcut [abcd1234] save a checkpoint" in message
    assert "3 to go" in message and "Resume with `run_experiment" in message
