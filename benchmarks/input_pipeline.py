"""Input pipeline vs train step: is the data or the model the bottleneck?

    python benchmarks/input_pipeline.py                        # every path, CPU-sized defaults
    python benchmarks/input_pipeline.py --batch 64 --vae full  # a GPU machine with sd-vae-ft-mse weights

For each dataset path training can take it reports images/s of
  data:  batches from the path's iterator put on the devices by the training's DevicePrefetcher
         (host batch -> sharded jax.Array), nothing else running;
  step:  the train step it feeds on a synthetic batch already on the device (compiled beforehand);
  fed:   the train step fed by the path through the prefetcher, as `train()` runs it.
`fed` close to `step` means the pipeline keeps up; `data` < `step` means it is the bottleneck.

Paths: `digits` (in-memory TFDS, 8x8, feeding digits_shortcut), and at 256x256 feeding the DiT-B/2
latent model of celeba_ditb_shortcut: `image folder` (a TFDS dataset built from a temporary folder
of synthetic PNGs, read in streaming mode as the 30k-image CelebA-HQ is), `pre-encoded latents`
(that folder encoded once, then posterior samples), `on-the-fly encoding` (the folder's images
through the VAE each batch). The VAE is the random reduced-width smoke VAE unless `--vae full`
(sd-vae-ft-mse, weights needed). On a CPU the data and the model share the same cores, so `fed`
there is a lower bound of what a GPU machine would see.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from shortcut import assembly
from shortcut.data import latents, make_train_iterator, pipeline, prepare_dataset
from shortcut.data.prefetch import DevicePrefetcher
from shortcut.sharding import Parallel
from shortcut.spec_files import load_spec
from shortcut.train import init_state, make_train_step
from shortcut.vae import LatentCodec


def _prefetched(it, parallel: Parallel) -> DevicePrefetcher:
    return DevicePrefetcher(it, lambda b: {k: parallel.shard(v) for k, v in b.items()}, size=2)


def data_rate(it, parallel: Parallel, batches: int) -> float:
    """images/s of `it` through the device prefetcher (after two warm-up batches)."""
    feed = _prefetched(it, parallel)
    try:
        for _ in range(2):
            jax.block_until_ready(next(feed))
        t = time.perf_counter()
        n = 0
        for _ in range(batches):
            batch = jax.block_until_ready(next(feed))
            n += len(batch["image"])
        return n / (time.perf_counter() - t)
    finally:
        feed.close()


class StepBench:
    """The jit-compiled train step of `spec`, timed on a synthetic device batch and fed by an iterator."""

    def __init__(self, spec, parallel: Parallel):
        self.spec, self.parallel = spec, parallel
        parts = assembly.build(spec)
        self.state = parallel.place(init_state(spec, parts.model, parts.optimizer, parts.objective))
        self.step = make_train_step(parts.apply_fn, parts.objective, parts.optimizer, spec, parallel, self.state)
        b, rng = spec.train.batch_size, np.random.default_rng(0)
        self.batch = {"image": parallel.shard(rng.uniform(-1, 1, (b, *spec.input_shape)).astype(np.float32)),
                      "label": parallel.shard(rng.integers(0, max(spec.data.num_classes, 1), (b,)).astype(np.int32))}
        self.state, metrics = self.step(self.state, self.batch)  # compile
        jax.block_until_ready(metrics)

    def synthetic_rate(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        return steps * self.spec.train.batch_size / (time.perf_counter() - t)

    def fed_rate(self, it, steps: int) -> float:
        feed = _prefetched(it, self.parallel)
        try:
            self.state, metrics = self.step(self.state, next(feed))  # warm the pipeline
            jax.block_until_ready(metrics)
            t = time.perf_counter()
            for _ in range(steps):
                self.state, metrics = self.step(self.state, next(feed))
            jax.block_until_ready(metrics)
            return steps * self.spec.train.batch_size / (time.perf_counter() - t)
        finally:
            feed.close()


def image_folder_dataset(root: Path, count: int, size: int = 256) -> str:
    """A celebahq256 TFDS dataset in `root` built from `count` synthetic PNGs (smooth + noise)."""
    folder = root / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), xx * yy], -1) * 100 + 128
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    prepare_dataset("celebahq256", data_dir=str(root / "tfds"), manual_dir=str(folder))
    return str(root / "tfds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20, help="timed data batches per path")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (default: 20 digits, 3 DiT-B/2 "
                                                          "on a CPU, 20 otherwise)")
    p.add_argument("--batch", type=int, default=None, help="batch of the 256x256 paths and DiT-B/2 (default: 8 on "
                                                          "a CPU, the spec's 64 otherwise)")
    p.add_argument("--images", type=int, default=128, help="synthetic images in the folder dataset")
    p.add_argument("--vae", choices=["smoke", "full"], default="smoke")
    p.add_argument("--model-size", default="B", help="DiT size of the 256x256 step (S, B, XL; the spec: B)")
    args = p.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    parallel_for = lambda b: Parallel.create(b, "dp")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {platform.processor() or platform.machine()}")
    rows = []

    digits = load_spec("digits_shortcut")
    par = parallel_for(digits.train.batch_size)
    mk = lambda: make_train_iterator("digits", batch_size=digits.train.batch_size, seed=0)
    bench = StepBench(digits, par)
    steps = args.steps or 20
    rows.append(("digits (in memory)", "8x8x1", data_rate(mk(), par, args.batches), "digits_shortcut",
                 digits.train.batch_size, bench.synthetic_rate(steps), bench.fed_rate(mk(), steps)))

    batch = args.batch or (8 if on_cpu else 64)
    overrides = [f"train.batch_size={batch}", f"model.size={args.model_size}"] + (
        ["model.dtype=float32"] if on_cpu else [])
    celeba = load_spec("celeba_ditb_shortcut", overrides)
    par = parallel_for(batch)
    codec = LatentCodec.from_spec(celeba.data.latent, args.vae == "smoke", batch_size=batch)
    steps = args.steps or (3 if on_cpu else 20)
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        data_dir = image_folder_dataset(Path(tmp), args.images)
        pipeline.IN_MEMORY_MAX_BYTES = 0  # stream, as the real 30k-image folder does (5.9 GB decoded)
        images = lambda: make_train_iterator("celebahq256", batch_size=batch, seed=0, data_dir=data_dir,
                                             flip=celeba.data.flip, shuffle_buffer=64)
        spec = load_spec("celeba_ditb_shortcut", overrides + [f"data.data_dir={data_dir}"])
        encoded = latents.pre_encode(spec, codec, Path(tmp) / "latents", log=lambda s: None)
        pre = lambda: latents.make_latent_iterator(encoded, scale=celeba.data.latent.scale, batch_size=batch,
                                                   seed=0, flip=celeba.data.flip, num_classes=0, shuffle_buffer=64)
        fly = lambda: latents.EncodedIterator(images(), codec, seed=0)
        step_name = "celeba_ditb_shortcut" + ("" if args.model_size == "B" else f", model.size={args.model_size}")
        bench = StepBench(celeba, par)
        step_rate = bench.synthetic_rate(steps)
        shape = "x".join(map(str, celeba.input_shape))
        vae = f"{codec.description}"
        rows.append(("image folder (streamed PNG, pixels)", "256x256x3", data_rate(images(), par, args.batches),
                     f"{step_name} (after encoding)", batch, step_rate, None))
        rows.append(("pre-encoded latents", shape, data_rate(pre(), par, args.batches), step_name,
                     batch, step_rate, bench.fed_rate(pre(), steps)))
        rows.append((f"on-the-fly encoding ({vae})", shape, data_rate(fly(), par, max(args.batches // 4, 3)),
                     step_name, batch, step_rate, bench.fed_rate(fly(), steps)))

    print(f"\nDiT-{args.model_size}/2 step: {'float32 on a CPU' if on_cpu else 'bfloat16'}, batch {batch}; "
          f"{args.images} synthetic 256x256 images\n")
    print("| data path | batch shape | data images/s | train step | batch | step images/s (synthetic) | "
          "step images/s (fed) | bottleneck |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    for path, shp, data, spec_name, b, step, fed in rows:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        neck = "-" if step is None else ("data" if data < step else "model")
        print(f"| {path} | {shp} | {data:.1f} | {spec_name} | {b} | {fmt(step)} | {fmt(fed)} | {neck} |")


if __name__ == "__main__":
    main()
