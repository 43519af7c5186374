"""What minibatch optimal transport costs: milliseconds per pairing of a batch of noise with a batch of data.

    python benchmarks/ot_pairing.py                          # digits-sized rows (8x8x1), batches 128, 256, 1024
    python benchmarks/ot_pairing.py --shape 32 32 4 --batch 256
    python benchmarks/ot_pairing.py --batch 128 --pool 1 8 32   # method.ot_pool: one solve over K batches

Times `shortcut.pairing.pair_noise` jit-compiled (the compile excluded), for `none` (no pairing: the
baseline), `exact` (SciPy's assignment through a host callback) and `sinkhorn` (OTT-JAX, epsilon 0.05 of
the mean cost): wall-clock milliseconds and, in brackets, this process's CPU milliseconds (all its
threads; on a shared machine the wall clock includes waiting for the cores). With a pool K
(`method.ot_pool`) one pairing covers K * batch rows and serves K steps: the line gives the milliseconds
per solve and per step (a solve over K). The whole train step's cost shows in a run's `steps_per_sec`
(docs/methods.md).
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
    p.add_argument("--pool", type=int, nargs="+", default=[1], help="K: batches per pairing (method.ot_pool)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    print(f"{platform.node()} {jax.devices()[0].platform}: rows {tuple(args.shape)}, ms per pairing (CPU ms)")
    for b, k in ((b, k) for b in args.batch for k in args.pool):
        x0, x1 = (jax.random.normal(jax.random.PRNGKey(i), (k * b, *args.shape)) for i in (0, 1))
        cells = []
        for mode in ("none", "exact", "sinkhorn"):
            pair = jax.jit(lambda key, a, c, mode=mode: pair_noise(key, a, c, mode))
            pair(jax.random.PRNGKey(2), x0, x1).block_until_ready()  # compile
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(args.repeats):
                pair(jax.random.PRNGKey(i), x0, x1).block_until_ready()
            ms, cpu_ms = ((now - t0) / args.repeats * 1e3 for now, t0 in
                          ((time.perf_counter(), start), (time.process_time(), cpu)))
            cells.append(f"{mode} {ms:.2f} ({cpu_ms:.2f} CPU)" if k == 1 else
                         f"{mode} {ms:.1f} ({cpu_ms:.1f} CPU) per solve, {ms / k:.2f} ({cpu_ms / k:.2f} CPU) per step")
        print(f"batch {b}" + (f", pool {k} ({k * b} rows)" if k > 1 else "") + ": " + ", ".join(cells))


if __name__ == "__main__":
    main()
