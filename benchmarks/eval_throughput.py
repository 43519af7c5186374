"""Evaluation throughput: samples/s through sampling + feature extraction, per step count.

    python benchmarks/eval_throughput.py                       # digits_shortcut, fd_digits features
    python benchmarks/eval_throughput.py --fid --samples 64    # + the FID Inception (random weights) at 299x299

Uses randomly initialised generator weights: throughput does not depend on the weights. Compilation
is excluded (one warm-up batch per step count). `--fid` times the FID feature network on the
digits samples resized to 299x299, with random Inception weights (a speed figure, not a score).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from shortcut import assembly
from shortcut.sampling import sample_range
from shortcut.spec_files import load_spec
from shortcut.train import init_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="digits_shortcut")
    p.add_argument("--samples", type=int, default=2000, help="timed samples per step count")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--fid", action="store_true", help="also time the FID Inception on the samples")
    args = p.parse_args()

    spec = load_spec(args.spec)
    parts = assembly.build(spec)
    params = init_state(spec, parts.model, parts.optimizer, parts.objective).ema_params
    sampler = parts.sampler
    common = dict(shape=spec.input_shape, num_classes=spec.data.num_classes, seed=0)

    from shortcut.evaluation import DigitsFeatureNet, InceptionFeatureNet
    from shortcut.evaluation.inception import random_inception_variables

    nets = [DigitsFeatureNet.load()]
    if args.fid:
        import tempfile

        from shortcut.evaluation.inception_weights import save_variables_npz

        path = f"{tempfile.mkdtemp()}/random_inception.npz"
        save_variables_npz(path, random_inception_variables(0), {"note": "random weights, benchmark only"})
        nets.append(InceptionFeatureNet.load(path, expected_sha256=None))

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {platform.processor() or platform.machine()}; {args.spec}, "
          f"{args.samples} samples, batch {args.batch_size}")
    print("| steps | NFE | sampling samples/s | " + " | ".join(f"{n.name} features/s" for n in nets) + " | end to end samples/s |")
    print("|---:|---:|---:|" + "---:|" * len(nets) + "---:|")
    for n, w, _ in spec.eval.settings():
        common["cfg_scale"] = w
        warm, _ = sample_range(sampler, params, 0, args.batch_size, num_steps=n, **common)
        for net in nets:
            np.asarray(net.features(warm))
        t_sample, t_feat = 0.0, [0.0] * len(nets)
        for start in range(0, args.samples, args.batch_size):
            t0 = time.perf_counter()
            images, _ = sample_range(sampler, params, start, args.batch_size, num_steps=n, **common)
            t_sample += time.perf_counter() - t0
            for i, net in enumerate(nets):
                t0 = time.perf_counter()
                np.asarray(net.features(images))
                t_feat[i] += time.perf_counter() - t0
        total = args.samples
        feats = " | ".join(f"{total / t:.0f}" for t in t_feat)
        print(f"| {n} | {parts.objective.network_evaluations(n, w)} | {total / t_sample:.0f} | {feats} | "
              f"{total / (t_sample + sum(t_feat)):.0f} |")


if __name__ == "__main__":
    main()
