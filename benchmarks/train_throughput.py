"""Training throughput: steps/s and images/s of the real jit-compiled train step.

    python benchmarks/train_throughput.py                 # digits_shortcut, digits_flow, DiT-B/2 latents
    python benchmarks/train_throughput.py --steps 50

Batches are synthetic (the input pipeline is benchmarked separately), drawn once and reused, so
the figure is the model + objective + optimizer cost. Compilation is timed on its own.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from shortcut import assembly
from shortcut.spec_files import load_spec
from shortcut.train import init_state, make_train_step

CASES = [
    ("digits_shortcut", []),
    ("digits_flow", []),
    ("celeba_ditb_shortcut", ["train.batch_size=8", "model.dtype=float32"]),
]


def measure(name: str, overrides: list[str], steps: int) -> dict:
    spec = load_spec(name, overrides)
    parts = assembly.build(spec)
    state = init_state(spec, parts.model, parts.optimizer)
    step = make_train_step(parts.apply_fn, parts.objective, parts.optimizer, spec)
    b = spec.train.batch_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (b, *spec.input_shape)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, max(spec.data.num_classes, 1), (b,)).astype(np.int32))
    batch = {"image": images, "label": labels}

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"spec": name, "method": spec.method.name, "input": "x".join(map(str, spec.input_shape)), "batch": b,
            "params": n_params, "compile_s": compile_s, "steps_per_s": steps / seconds,
            "images_per_s": steps * b / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per case (after one compile step)")
    p.add_argument("--big-steps", type=int, default=3, help="timed steps for DiT-B/2 on a CPU")
    args = p.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {platform.processor() or platform.machine()}")
    rows = []
    for name, overrides in CASES:
        steps = args.big_steps if on_cpu and "ditb" in name else args.steps
        rows.append(measure(name, overrides, steps))
    header = "| spec | method | input | batch | params | compile s | steps/s | images/s |"
    print(header)
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['spec']} | {r['method']} | {r['input']} | {r['batch']} | {r['params'] / 1e6:.2f} M | "
              f"{r['compile_s']:.1f} | {r['steps_per_s']:.2f} | {r['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
