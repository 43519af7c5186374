"""What minibatch optimal transport costs: milliseconds per pairing of a batch of noise with a batch of data.

    python benchmarks/ot_pairing.py                          # digits-sized rows (8x8x1), batches 128, 256, 1024
    python benchmarks/ot_pairing.py --shape 32 32 4 --batch 256

Times `shortcut.pairing.pair_noise` jit-compiled (the compile excluded), for `none` (no pairing: the
baseline), `exact` (SciPy's assignment through a host callback) and `sinkhorn` (OTT-JAX, epsilon 0.05 of
the mean cost). The whole train step's cost shows in a run's `steps_per_sec` (docs/methods.md).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax

from shortcut.pairing import pair_noise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256, 1024])
    p.add_argument("--shape", type=int, nargs=3, default=[8, 8, 1], metavar=("H", "W", "C"))
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    print(f"{platform.node()} {jax.devices()[0].platform}: rows {tuple(args.shape)}, ms per pairing")
    for b in args.batch:
        x0, x1 = (jax.random.normal(jax.random.PRNGKey(i), (b, *args.shape)) for i in (0, 1))
        cells = []
        for mode in ("none", "exact", "sinkhorn"):
            pair = jax.jit(lambda k, a, c, mode=mode: pair_noise(k, a, c, mode))
            pair(jax.random.PRNGKey(2), x0, x1).block_until_ready()  # compile
            start = time.perf_counter()
            for i in range(args.repeats):
                pair(jax.random.PRNGKey(i), x0, x1).block_until_ready()
            cells.append(f"{mode} {(time.perf_counter() - start) / args.repeats * 1e3:.2f}")
        print(f"batch {b}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
