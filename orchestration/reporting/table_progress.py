"""A table's progress as its driver shows it (console.TableReport): runs finished / running / waiting, the time
left, each running run's step; and on Ctrl-C what is kept and how to resume.

On a terminal (shortcut.progress) the table is one more bar among its runs' bars, all drawn by Ray's bar
manager so they never overlap; elsewhere it is a plain line every PLAIN_EVERY_S seconds.
"""

from __future__ import annotations

import shlex
import sys
import time
from typing import Callable

from shortcut import progress

PLAIN_EVERY_S = 30.0
DONE = ("finished", "cached")


def eta_seconds(nodes: dict, running: list[str], board: dict, now: float | None = None) -> float | None:
    """Seconds until the table ends: the running runs' time left (from their step rate, else the finished runs'
    mean time) plus the waiting runs at the mean time of the runs finished here, over the runs in parallel.
    None until some run has finished or made steps."""
    now = time.time() if now is None else now
    took = [n.ended - n.started for n in nodes.values() if n.status == "finished" and n.started is not None and n.ended is not None]
    mean = sum(took) / len(took) if took else None
    left, projected = [], []
    for key in running:
        node, b = nodes[key], board.get(key, {})
        elapsed = now - b.get("started", node.started or now)
        if b.get("step") and b.get("total"):
            left.append(elapsed * (b["total"] - b["step"]) / b["step"])
            projected.append(elapsed + left[-1])
        elif mean is not None:
            left.append(max(0.0, mean - elapsed))
        else:
            return None
    if mean is None and projected:  # nothing finished yet: the running runs' projected run time stands in
        mean = sum(projected) / len(projected)
    waiting = sum(n.status in ("waiting", "elsewhere") for n in nodes.values())
    if mean is None:
        return None
    return (sum(left) + waiting * mean) / max(1, len(running))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def counts(nodes: dict) -> str:
    """'3 finished, 2 running, 22 waiting' (and failed / elsewhere where there are such runs)."""
    n = {s: sum(node.status == s for node in nodes.values()) for s in ("running", "elsewhere", "failed", "skipped")}
    done = sum(node.status in DONE for node in nodes.values())
    waiting = sum(node.status == "waiting" for node in nodes.values())
    parts = [f"{done}/{len(nodes)} finished", f"{n['running']} running", f"{waiting} waiting"]
    parts += [f"{v} {k}" for k, v in n.items() if v and k != "running"]
    return ", ".join(parts)


def line(nodes: dict, running: list[str], board: dict) -> str:
    """The plain progress line: counts, time left, each running run's step."""
    steps = []
    for key in running:
        b = board.get(key, {})
        steps.append(f"{nodes[key].spec.name} {b['step']}/{b['total']}" if "step" in b else
                     f"{nodes[key].spec.name} {b.get('phase', 'queued')}")
    return (f"{counts(nodes)}; time left {duration(eta_seconds(nodes, running, board))}"
            + (f" | running: {', '.join(steps)}" if steps else ""))


class TableProgress:
    """The driver's view, refreshed by `update` on every pass of its scheduling loop."""

    def __init__(self, name: str, say: Callable[[str], None]):
        self.name, self.say = name, say
        self.bars = progress.shows_bars()
        self.last_plain = time.time()
        self._bar, self._done = None, 0

    def update(self, nodes: dict, running: list[str], board: dict) -> None:
        if self.bars:
            if self._bar is None:
                import ray

                self._bar = progress.bar(len(nodes), self.name, unit="run", through_ray=ray.is_initialized())
            done = sum(n.status in DONE for n in nodes.values())
            self._bar.update(done - self._done)
            self._done = done
            self._bar.note(f"{counts(nodes)}, time left {duration(eta_seconds(nodes, running, board))}")
        elif running and time.time() - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = time.time()
            self.say(line(nodes, running, board))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def interrupted(nodes: dict, running: list[str]) -> str:
    """What Ctrl-C keeps of a table and the command that resumes it."""
    done = [n for n in nodes.values() if n.status in DONE]
    stopped = [nodes[k].label for k in running]
    command = shlex.join(["run_experiment", *sys.argv[1:]]) if sys.argv[1:] else "run_experiment with the same arguments"
    return (f"interrupted: kept {len(done)} finished run(s) (their run records and results records)"
            + (f"; {', '.join(stopped)} save a checkpoint at their current step" if stopped else "")
            + f"; {len(nodes) - len(done)} to go. Resume with `{command}`: finished runs are skipped, interrupted "
            "ones continue from their last checkpoint")
