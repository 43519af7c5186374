"""Train the digits classifier behind ``fd_digits`` and write its shipped weights.

    python -m shortcut.evaluation.train_digits_classifier [--out-dir DIR]

Deterministic: fixed seed, full-batch AdamW on the train split (index % 5 != 0),
float32 on CPU. Writes ``digits_mlp.npz`` (byte-reproducible for identical weights)
and ``digits_mlp.json`` (accuracies, sha256 of the npz, training settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shortcut.evaluation import digits_classifier as dc

SEED = 0
STEPS = 300
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-3


def train_digits_classifier(seed: int = SEED, steps: int = STEPS, learning_rate: float = LEARNING_RATE,
                            weight_decay: float = WEIGHT_DECAY) -> tuple[dict, dict]:
    """Train on the train split; return (params, metrics with train/test accuracy)."""
    with jax.default_device(jax.devices("cpu")[0]):
        images, labels = dc.load_digits_data()
        test = dc.test_split_mask(len(labels))
        x_tr, y_tr = jnp.asarray(images[~test]), jnp.asarray(labels[~test])
        model = dc.DigitsMLP()
        params = model.init(jax.random.PRNGKey(seed), x_tr[:1])["params"]
        tx = optax.adamw(learning_rate, weight_decay=weight_decay)

        def loss_fn(p):
            _, logits = model.apply({"params": p}, x_tr)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_tr).mean()

        @jax.jit
        def run(p):
            def step(_, carry):
                p, s = carry
                g = jax.grad(loss_fn)(p)
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            return jax.lax.fori_loop(0, steps, step, (p, tx.init(p)))[0]

        params = run(params)
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)

        def acc(mask):
            _, logits = model.apply({"params": params}, jnp.asarray(images[mask]))
            return float(np.mean(np.asarray(logits).argmax(-1) == labels[mask]))

        metrics = {"train_accuracy": acc(~test), "test_accuracy": acc(test),
                   "train_size": int((~test).sum()), "test_size": int(test.sum())}
    return params, metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shortcut.evaluation.train_digits_classifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=dc.WEIGHTS_DIR)
    args = ap.parse_args(argv)
    params, metrics = train_digits_classifier()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / dc.WEIGHTS_FILE.name
    dc.save_npz_deterministic(weights, dc.flatten_params(params))
    info = {
        "name": dc.DigitsFeatureNet.name,
        "sha256": dc._sha256(weights),
        **metrics,
        "architecture": f"MLP 64-{'-'.join(map(str, dc.HIDDEN))}-{dc.NUM_CLASSES}, GELU; features = last hidden layer before its GELU",
        "split": "test = index % 5 == 0 of sklearn load_digits (1797 images)",
        "input": "float32 [N, 8, 8, 1] in [-1, 1] (v / 16 * 2 - 1)",
        "training": {"seed": SEED, "steps": STEPS, "optimizer": "adamw", "learning_rate": LEARNING_RATE,
                     "weight_decay": WEIGHT_DECAY, "batch": "full train split", "dtype": "float32", "device": "cpu"},
        "jax_version": jax.__version__,
    }
    (args.out_dir / dc.INFO_FILE.name).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: info[k] for k in ("sha256", "train_accuracy", "test_accuracy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
