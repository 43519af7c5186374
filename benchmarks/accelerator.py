"""Accelerator benchmark: train-step MFU and FID-50k wall time, measured against issue 17's targets.

    python benchmarks/accelerator.py            # a GPU machine: about 5-8 minutes on one H200
    python benchmarks/accelerator.py --smoke    # end to end on a CPU at a tiny size (well under a minute)

Train step: DiT-B/2 and DiT-XL/2 shortcut models (imagenet_ditb_shortcut, imagenet_ditxl_shortcut) at
the paper's batch size (256), bfloat16, under `dp` and `fsdp` (fsdp only with more than one device:
on one device it is dp). For each: step time, images/s, memory (XLA's compiled estimate per device,
and the allocator's peak where the device reports it), and MFU = XLA's cost-analysis FLOPs of the
compiled (per-device) step / step time / the device's peak dense bf16 FLOP/s (`DEVICES` in orchestration/planning/devices.py). Custom
calls (a fused cuDNN attention) are not in XLA's FLOP count, so MFU then reads low, not high.

FID-50k: DiT-B/2 sampling at 1 and 4 steps (the spec's guidance scale there), sd-vae-ft-mse decode,
FID Inception pool3 features, streaming statistics and the Frechet distance, the evaluation's own
functions (shortcut.sampling, LatentCodec, compute_fid). The weights are real where their files are
present; otherwise random (the output says so; the wall time does not depend on weight values). The
DiT is randomly initialised: this times the pipeline, it is no FID of a trained model.

Writes results/benchmarks/<device>.json and .md (`--out-dir` elsewhere; `--smoke` appends -smoke).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import time
from pathlib import Path

import jax
import numpy as np

from orchestration.planning.devices import device_for_kind
from shortcut import assembly
from shortcut.compute import xla_flops
from shortcut.sampling import noise_for, sample_labels
from shortcut.sharding import Parallel
from shortcut.spec_files import load_spec
from shortcut.train import init_state, make_train_step

REPO = Path(__file__).resolve().parents[1]
TARGET_MFU = 0.45  # DiT-B/2 training on an H100/H200
TARGET_FID_1STEP_S = 90.0  # FID-50k at 1 step with VAE decode, one H100/H200
TARGET_DEVICES = ("H100", "H200")
TRAIN_CASES = [("DiT-B/2", "imagenet_ditb_shortcut"), ("DiT-XL/2", "imagenet_ditxl_shortcut")]
FID_CASE = ("DiT-B/2", "imagenet_ditb_shortcut")


def peak_flops(kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a JAX device kind: the planner's table (orchestration/planning/devices.py DEVICES)."""
    device = device_for_kind(kind)
    return device.peak_flops if device else None


def _smoke_overrides() -> list[str]:
    # 64 px images (8x8x4 latents), one block: the smallest sizes that still run every stage.
    return ["model.size=null", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.dtype=float32",
            "data.image_size=64", "train.batch_size=8", "data.latent.batch_size=8", "eval.batch_size=8"]


def train_case(label: str, name: str, strategy: str, overrides: list[str], steps: int, peak: float | None) -> dict:
    spec = load_spec(name, ["model.dtype=bfloat16", *overrides])
    b = spec.train.batch_size
    parallel = Parallel.create(b, strategy)
    parts = assembly.build(spec)
    state = parallel.place(init_state(spec, parts.model, parts.optimizer, parts.objective))
    rng = np.random.default_rng(0)
    batch = {"image": parallel.shard(rng.standard_normal((b, *spec.input_shape), np.float32)),
             "label": parallel.shard(rng.integers(0, max(spec.data.num_classes, 1), (b,)).astype(np.int32))}
    t0 = time.perf_counter()
    compiled = make_train_step(parts.apply_fn, parts.objective, parts.optimizer, spec, parallel, state).lower(
        state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled) or 0.0
    mem = compiled.memory_analysis()
    compiled_bytes = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    stats = jax.devices()[0].memory_stats() or {}
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    del state, batch, compiled
    gc.collect()
    return {"model": label, "spec": name, "strategy": strategy, "batch": b, "dtype": spec.model.dtype,
            "params": int(n_params), "devices": parallel.num_devices, "compile_s": compile_s, "step_s": step_s,
            "images_per_s": b / step_s, "flops_per_step_per_device": flops,
            "mfu": flops / step_s / peak if peak and flops else None,
            "compiled_bytes_per_device": compiled_bytes, "allocator_peak_bytes": stats.get("peak_bytes_in_use"),
            "timed_steps": steps}


def fid_components(spec, smoke: bool, vae_dtype: str) -> tuple[object, object, list[str]]:
    """(codec, inception net, notes): real weights where present, random stand-ins otherwise."""
    import jax.numpy as jnp

    from shortcut.evaluation import InceptionFeatureNet
    from shortcut.evaluation.inception import random_inception_variables
    from shortcut.vae import LatentCodec
    from shortcut.vae.model import SD_VAE_FT_MSE
    from shortcut.vae.weights import random_vae

    notes = []
    lat = spec.data.latent
    dtype = jnp.bfloat16 if vae_dtype == "bfloat16" else None
    try:
        if smoke:
            raise FileNotFoundError("--smoke")
        codec = LatentCodec.from_spec(lat, False, batch_size=lat.batch_size, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any missing/unverifiable file: time the same architecture
        config = None if smoke else SD_VAE_FT_MSE
        module, params = random_vae(config, seed=0)
        codec = LatentCodec(module, params, scale=lat.scale, batch_size=lat.batch_size, dtype=dtype,
                            description="random-init " + ("smoke VAE" if smoke else "sd-vae-ft-mse architecture"))
        notes.append(f"VAE: {codec.description} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    try:
        if smoke:
            raise FileNotFoundError("--smoke")
        net = InceptionFeatureNet.load()
    except Exception as e:  # noqa: BLE001
        net = InceptionFeatureNet(random_inception_variables(0), "random-init", image_size=75 if smoke else 299)
        notes.append(f"Inception: random-init weights at {net.image_size} px "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if smoke:
        net = _FirstFeatures(net, 64)
        notes.append("--smoke: the Frechet distance over the first 64 of the 2048 pool3 features (2048-d "
                     "matrix square roots alone take a minute on a small CPU)")
    return codec, net, notes


class _FirstFeatures:
    """A feature net keeping its first `dim` features (--smoke only)."""

    def __init__(self, net, dim: int):
        self.net, self.dim = net, dim
        self.name, self.sha256 = f"{net.name}[:{dim}]", net.sha256

    def features(self, images) -> np.ndarray:
        return self.net.features(images)[:, :self.dim]

    def provenance(self) -> dict:
        return {**self.net.provenance(), "feature_net": self.name}


def fid_case(num_steps: int, spec, params, sampler, codec, net, num_samples: int) -> dict:
    """Wall time of one FID over `num_samples` (sampling, decode, features, Frechet distance), compiled first."""
    from shortcut.evaluation import ReferenceStats
    from shortcut.evaluation.fid import compute_fid

    ev = spec.eval
    w = next(s.cfg_scale for s in ev.settings() if s.num_steps == num_steps)
    shape, classes, seed = spec.input_shape, spec.data.num_classes, spec.seed + 1
    times = {"sample": 0.0, "decode": 0.0}

    def batches(start: int, count: int) -> np.ndarray:
        t = time.perf_counter()
        labels = sample_labels(start, ev.batch_size, classes)
        z = np.asarray(sampler(params, noise_for(start, ev.batch_size, shape, seed), jax.numpy.asarray(labels),
                               num_steps=num_steps, cfg_scale=w))[:count]
        t1 = time.perf_counter()
        images = codec.decode(z)
        times["sample"] += t1 - t
        times["decode"] += time.perf_counter() - t1
        return images

    reference = ReferenceStats(np.zeros(net.dim), np.eye(net.dim), 1, {"feature_net": net.name,
                                                                       "feature_net_sha256": net.sha256})
    t0 = time.perf_counter()
    net.features(batches(0, ev.batch_size))  # compile sampler, decoder and Inception at this batch
    compile_s = time.perf_counter() - t0
    times = {"sample": 0.0, "decode": 0.0}
    t0 = time.perf_counter()
    result = compute_fid(batches, num_samples, ev.batch_size, reference, net, progress=False)
    wall = time.perf_counter() - t0
    return {"num_steps": num_steps, "cfg_scale": w, "num_samples": num_samples, "batch": ev.batch_size,
            "wall_s": wall, "compile_s": compile_s, "sample_s": times["sample"], "decode_s": times["decode"],
            "features_and_stats_s": wall - times["sample"] - times["decode"],
            "value_vs_stand_in_stats": result.value}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def device_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def render(report: dict) -> str:
    t = report["targets"]
    lines = [f"# Accelerator benchmark: {report['device']} x{report['device_count']}"
             + (" (--smoke: tiny sizes, not a measurement)" if report["smoke"] else ""), "",
             f"jax {report['jax']}, {report['date']}; peak dense bf16 per device: "
             + (f"{report['peak_bf16_flops'] / 1e12:.0f} TFLOP/s" if report["peak_bf16_flops"] else "unknown"), "",
             "| model | strategy | batch | step ms | images/s | TFLOP/step/device | MFU | target | "
             "compiled GiB/device | allocator peak GiB |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    gib = lambda v: "-" if v is None else f"{v / 2**30:.2f}"
    for r in report["train"]:
        target = f">= {TARGET_MFU:.0%}" + (f" ({'met' if r['mfu'] >= TARGET_MFU else 'NOT met'})"
                                         if r["model"] == "DiT-B/2" and t["applies"] and r["mfu"] else "")
        lines.append(f"| {r['model']} | {r['strategy']} | {r['batch']} | {r['step_s'] * 1e3:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['flops_per_step_per_device'] / 1e12:.2f} | "
                     f"{pct(r['mfu'])} | "
                     f"{target if r['model'] == 'DiT-B/2' else '-'} | {gib(r['compiled_bytes_per_device'])} | "
                     f"{gib(r['allocator_peak_bytes'])} |")
    lines += ["", "| FID | samples | batch | wall s | sampling s | VAE decode s | Inception + stats s | compile s | "
              "target |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["fid"]:
        target = "-"
        if r["num_steps"] == 1:
            target = f"< {TARGET_FID_1STEP_S:.0f} s" + (
                f" ({'met' if r['wall_s'] < TARGET_FID_1STEP_S else 'NOT met'})" if t["applies"] else "")
        wall = f"{r['wall_s']:.1f}" + (f" ({r['extrapolated_wall_s']:.0f} s extrapolated)"
                                        if "extrapolated_wall_s" in r else "")
        lines.append(f"| {r['num_steps']} step(s), w={r['cfg_scale']:g} | {r['num_samples']} | {r['batch']} | "
                     f"{wall} | {r['sample_s']:.1f} | {r['decode_s']:.1f} | "
                     f"{r['features_and_stats_s']:.1f} | {r['compile_s']:.1f} | {target} |")
    lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CPU): checks the script only")
    p.add_argument("--out-dir", default=str(REPO / "results" / "benchmarks"))
    p.add_argument("--steps", type=int, default=None, help="timed train steps per case (default 10; smoke 2)")
    p.add_argument("--fid-samples", type=int, default=None, help="default 50000 (smoke 16)")
    p.add_argument("--strategies", default=None, help="comma-separated; default dp, plus fsdp with > 1 device "
                                                      "(both under --smoke)")
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="decoder compute dtype (float32 is what a run uses)")
    p.add_argument("--budget-s", type=float, default=480, help="whole-script wall-time budget (default 8 min)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    smoke = args.smoke
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    n_dev = jax.device_count()
    strategies = (args.strategies.split(",") if args.strategies else
                  ["dp", "fsdp"] if smoke or n_dev > 1 else ["dp"])
    overrides = _smoke_overrides() if smoke else []
    steps = args.steps or (2 if smoke else 10)
    notes = []
    if jax.default_backend() == "cpu" and not smoke:
        notes.append("no accelerator: these are CPU figures")
    if n_dev == 1 and "fsdp" not in strategies:
        notes.append("fsdp not run: on one device it is dp (nothing to shard); --strategies dp,fsdp forces it")
    if peak is None:
        notes.append(f"no peak FLOP/s known for device kind {kind!r}: MFU not computed")
    print(f"device: {kind} x{n_dev} ({jax.default_backend()}), peak bf16 "
          f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", flush=True)

    train_rows = []
    for label, name in TRAIN_CASES:
        for strategy in strategies:
            row = train_case(label, name, strategy, overrides, steps, peak)
            train_rows.append(row)
            print(f"{label} {strategy}: {row['step_s'] * 1e3:.1f} ms/step, {row['images_per_s']:.1f} images/s, "
                  f"MFU {pct(row['mfu'])} "
                  f"(compile {row['compile_s']:.1f} s)", flush=True)

    label, name = FID_CASE
    spec = load_spec(name, overrides)
    parts = assembly.build(spec)
    params = jax.device_put(init_state(spec, parts.model, parts.optimizer, parts.objective).ema_params,
                            Parallel.create(spec.eval.batch_size).replicated)
    sampler = parts.sampler
    codec, net, fid_notes = fid_components(spec, smoke, args.vae_dtype)
    notes += fid_notes + [f"FID: {label} ({name}) randomly initialised, {spec.model.dtype}; VAE decode "
                          f"{args.vae_dtype}, batch {spec.data.latent.batch_size}; the FID value is against "
                          "stand-in statistics and means nothing"]
    num_samples = args.fid_samples or (16 if smoke else 50_000)
    batch = spec.eval.batch_size
    fid_rows = []
    for n in (1, 4):
        count = num_samples
        if fid_rows:  # keep the whole script within --budget-s: the 4-step FID on fewer samples if need be
            first = fid_rows[0]
            per_sample = (first["wall_s"] + (n - 1) * first["sample_s"]) / first["num_samples"]
            left = args.budget_s - (time.perf_counter() - started) - 2 * first["compile_s"]
            count = min(num_samples, max(batch, int(left / per_sample) // batch * batch))
        row = fid_case(n, spec, params, sampler, codec, net, count)
        if count < num_samples:
            row["extrapolated_wall_s"] = row["wall_s"] * num_samples / count
            notes.append(f"FID at {n} steps: {count} samples measured to stay within --budget-s {args.budget_s:g}; "
                         f"its {num_samples}-sample wall time is extrapolated linearly")
        fid_rows.append(row)
        print(f"FID-{num_samples} at {n} step(s): {row['wall_s']:.1f} s (sampling {row['sample_s']:.1f}, decode "
              f"{row['decode_s']:.1f}, Inception + stats {row['features_and_stats_s']:.1f}; compile "
              f"{row['compile_s']:.1f})", flush=True)

    report = {"device": kind, "device_count": n_dev, "backend": jax.default_backend(), "smoke": smoke,
              "jax": jax.__version__, "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "peak_bf16_flops": peak, "train": train_rows, "fid": fid_rows, "notes": notes,
              "targets": {"mfu_ditb": TARGET_MFU, "fid50k_1step_s": TARGET_FID_1STEP_S,
                          "applies": not smoke and any(d in kind for d in TARGET_DEVICES)}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = device_slug(kind) + ("-smoke" if smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render(report))
    print(render(report))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
