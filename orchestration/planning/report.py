"""A plan's report: the step-time projection (compiled FLOPs / (peak x MFU)), the report as text, and where its
JSON is written (results/plans/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestration.planning.devices import Device

REPO_ROOT = Path(__file__).resolve().parents[2]


def seconds(flops_per_device: float | None, device: Device, mfu: float) -> float | None:
    """The projected time of a program: its FLOPs per device / (the device's peak dense FLOP/s x MFU); None
    without a FLOP count or a peak."""
    if not flops_per_device or not device.peak_flops:
        return None
    return flops_per_device / (device.peak_flops * mfu)


def step_time(flops_per_device: float | None, device: Device, mfu: float, steps: int) -> dict:
    """A train step's projected seconds and the run's days at `steps` steps (None where unknown)."""
    step_s = seconds(flops_per_device, device, mfu)
    return {"step_time_s": step_s, "run_days": None if step_s is None else step_s * steps / 86400}


def gib(n: float | None) -> str:
    """Bytes in GiB as the report shows them, "?" when unknown."""
    from shortcut import memory

    return "?" if n is None else memory.gib(n)


def _tflop(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3g} GFLOP"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.3g} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def summary(r: dict) -> str:
    """The report as text."""
    t = r["train"]
    lines = [f"# {r['spec']} on {r['topology']} ({r['num_devices']} x {r['device_kind']}), {r['sharding']}: "
             f"{r['num_params']:,} parameters",
             f"  {r['estimate']}; jax {r['jax']}" + (f", libtpu {r['libtpu']}" if r.get("libtpu") else "")]
    a = t["arguments"]
    lines.append(f"train step, batch {t['global_batch']} ({t['per_device_batch']} per device), per device:")
    lines.append(f"  arguments: params {gib(a['params'])}, EMA {gib(a['ema'])}, optimizer {gib(a['opt_state'])}"
                 + (f", teacher/aux {gib(a['aux'])}" if a.get("aux") else "") + f", batch {gib(a['batch'])}"
                 + (f" (XLA: {gib(a['xla_total'])} in all)" if a.get("xla_total") is not None else ""))
    if not t["oom"]:
        m = t["memory"]
        lines.append(f"  temporaries {gib(m['temp'])}, outputs {gib(m['output'])} ({gib(m['alias'])} of them "
                     f"written over donated arguments)")
    cap = r["device_memory"]
    lines.append(f"  total {gib(t['peak'])} of {gib(cap)} per device ({r['device']['label']}): "
                 + ("FITS" if t["fits"] else "DOES NOT FIT") + (f" [{t['message']}]" if t.get("message") else ""))
    if "max_per_device_batch" in t:
        best = t["max_per_device_batch"]
        lines.append(f"  largest per-device batch that fits: {best if best is not None else 'none'} "
                     f"(global {best * r['num_devices'] if best else '-'}; searched "
                     f"{', '.join(str(x['per_device_batch']) for x in t['batch_search'])})")
    lines.append(f"  FLOPs per step: {_tflop(t.get('flops_per_step'))} ({_tflop(t.get('flops_per_device'))} per device"
                 + (f"; from {t['flops_source']}" if t["oom"] and t.get("flops_per_step") else "") + ")")
    peak = r["device"]["peak_flops"]
    lines.append(f"  at {r['mfu']:.0%} MFU of {peak / 1e12:.1f} TFLOP/s per device: "
                 f"{_duration(t['step_time_s'])} per step, {_duration(t['run_days'] * 86400 if t['run_days'] else None)} "
                 f"for {t['steps']:,} steps [projection]" if peak else
                 "  no step-time projection: no peak FLOP/s for this device")
    if r.get("advice"):
        lines.append(f"  {r['advice']}")
    if peak:
        lines.append(f"  device figures: {r['device']['source']}")
    s = r.get("sampling")
    if s and not peak:
        lines.append(f"sampling at the eval batch {s['eval_batch']}: one step "
                     + ", ".join(f"at w={w} {_tflop(st['flops_per_device'])} per device" for w, st in s["steps"].items())
                     + "; no FID-50k time projection without a peak FLOP/s")
        s = None
    if s:
        lines.append(f"sampling at the eval batch {s['eval_batch']}:")
        for w, st in s["steps"].items():
            lines.append(f"  one step at w={w}: {_tflop(st['flops_per_device'])} per device, "
                         f"{gib(st['memory']['peak'])} per device")
        if s["vae_decode"]:
            lines.append(f"  VAE decode of one batch: {_tflop(s['vae_decode']['flops_per_device'])} per device")
        for key, f in s["fid50k"].items():
            lines.append(f"  FID-50k {key}: {_duration(f['total_s'])} (sampling {_duration(f['sampling_s'])}, VAE "
                         f"decode {_duration(f['vae_decode_s']) if f['vae_decode_s'] is not None else '-'}) [projection]")
    return "\n".join(lines)


def default_out(r: dict) -> Path:
    """results/plans/<spec>_<topology>_<sharding>.json."""
    return REPO_ROOT / "results" / "plans" / f"{r['spec']}_{r['topology'].replace(':', '-')}_{r['sharding']}.json"


def write(r: dict, path: Path | None = None) -> Path:
    """Write the report's JSON (atomically) to `path`, by default `default_out`."""
    path = Path(path) if path else default_out(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(r, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


