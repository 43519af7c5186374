"""How far a minibatch OT pairing moves the noise each class trains from away from N(0, I).

    python benchmarks/ot_class_shift.py                 # digits: batches of 128 of the train split
    python benchmarks/ot_class_shift.py --batches 300 --batch 256

A class-conditional model samples class y from N(0, I) noise, so it should train on noise that is N(0, I)
given y. For each pairing (`none`, `exact` across classes, `exact` within each class: method.ot_pairing and
method.ot_classes, shortcut/pairing.py) this draws `--batches` random batches of the digits train split
(pixels in [-1, 1], as the data pipeline gives them), pairs fresh noise with each, and prints, per class, the
length of the mean of the noise rows paired with that class (over all batches). An independent draw gives
about sqrt(D / n), n the class's rows over all batches (sampling error only), printed beside it.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from shortcut.data.digits import digits_uint8, split_indices
from shortcut.pairing import pair_noise


def class_noise_means(images: np.ndarray, labels: np.ndarray, mode: str, *, batch: int, batches: int,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the mean of the noise rows paired with it over `batches` batches, and its row count."""
    rng = np.random.default_rng(seed)
    pairing, within = {"none": ("none", False), "across": ("exact", False), "within": ("exact", True)}[mode]
    pair = jax.jit(lambda x0, x1, y: pair_noise(None, x0, x1, pairing, labels=y if within else None))
    classes = int(labels.max()) + 1
    sums, counts = np.zeros((classes, images[0].size)), np.zeros(classes)
    for i in range(batches):
        idx = rng.choice(len(images), batch, replace=False)
        x1, y = images[idx], labels[idx]
        x0 = jax.random.normal(jax.random.PRNGKey(seed * 100_003 + i), x1.shape)
        noise = np.asarray(pair(x0, x1, y)).reshape(batch, -1)
        np.add.at(sums, y, noise)
        counts += np.bincount(y, minlength=classes)
    return sums / counts[:, None], counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args()
    images, labels = digits_uint8()
    train = split_indices("train")
    x = images[train].astype(np.float32) / 127.5 - 1.0
    y = labels[train]
    print(f"digits train split, {args.batches} batches of {args.batch}: |mean of the noise paired with a class| "
          f"(class 0 .. 9; sampling error of an independent draw in brackets)")
    print("| pairing | mean over classes | per class |")
    print("|---|---|---|")
    for mode in ("none", "across", "within"):
        means, counts = class_noise_means(x, y, mode, batch=args.batch, batches=args.batches)
        norms = np.linalg.norm(means, axis=1)
        expected = np.sqrt(means.shape[1] / counts)
        print(f"| {mode} | {norms.mean():.3f} ({expected.mean():.3f}) | {' '.join(f'{v:.2f}' for v in norms)} |")


if __name__ == "__main__":
    main()
