"""SD-VAE throughput: images/s through the encoder (to posterior moments) and the decoder.

    python benchmarks/vae_throughput.py                                  # CPU: batch 4, float32
    python benchmarks/vae_throughput.py --batch 64 --dtype bfloat16      # GPU
    python benchmarks/vae_throughput.py --out vae_throughput.json

Runs the full sd-vae-ft-mse architecture with RANDOM weights: throughput does not depend on the
weight values, so no weights file is needed. Compilation is excluded (one warm-up call each); each
figure is the batch size over the median of ``--repeats`` timed calls, on one device. Prints one
JSON line (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from shortcut.vae.model import SD_VAE_FT_MSE, AutoencoderKL, VAEConfig, init_params


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per direction")
    p.add_argument("--smoke", action="store_true", help="the reduced-width smoke config instead of sd-vae-ft-mse")
    p.add_argument("--out", help="also write the JSON record to this file")
    args = p.parse_args()

    config = VAEConfig.smoke() if args.smoke else SD_VAE_FT_MSE
    module = AutoencoderKL(config, dtype=jnp.dtype(args.dtype))
    params = jax.device_put(init_params(config, seed=0))
    h, w, c = config.latent_shape((args.size, args.size))
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.uniform(-1, 1, (args.batch, args.size, args.size, config.in_channels)).astype(np.float32))
    latents = jax.device_put(rng.standard_normal((args.batch, h, w, c)).astype(np.float32))

    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="moments"))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    t_enc = _time(encode, params, images, repeats=args.repeats)
    t_dec = _time(decode, params, latents, repeats=args.repeats)

    device = jax.devices()[0]
    record = {
        "benchmark": "vae_throughput",
        "config": "smoke (reduced width)" if args.smoke else "sd-vae-ft-mse",
        "weights": "random (throughput does not depend on the weight values)",
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices_used": 1,
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "batch": args.batch,
        "image_size": args.size,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "encode_s_per_batch": round(t_enc, 4),
        "decode_s_per_batch": round(t_dec, 4),
        "encode_img_per_s": round(args.batch / t_enc, 3),
        "decode_img_per_s": round(args.batch / t_dec, 3),
    }
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
