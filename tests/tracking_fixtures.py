"""Synthetic run records (the shape of run.json) for the tracking and table tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATASETS = {  # dataset -> (image_size, channels, num_classes, latent)
    "digits": (8, 1, 10, None),
    "celebahq256": (256, 3, 0, {"autoencoder": "sd-vae-ft-mse", "scale": 0.18215, "downsample": 8, "channels": 4}),
}


def make_spec(name: str, method: str, dataset: str, seed: int = 0, size: str = "tiny", lr: float = 1e-3,
              grid_size: int = 4, steps=(128, 4, 1), metric: str = "fd_digits", num_samples: int = 2000) -> dict:
    image_size, channels, num_classes, latent = DATASETS[dataset]
    return {
        "name": name, "description": "synthetic", "seed": seed,
        "data": {"dataset": dataset, "channels": channels, "num_classes": num_classes, "split": "train",
                 "image_size": image_size, "flip": False, "data_dir": None, "shuffle_buffer": 100, "latent": latent},
        "model": {"size": size, "hidden_size": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 4.0, "patch_size": 2,
                  "d_conditioning": "level", "dtype": "float32"},
        "method": {"name": method, "denoise_timesteps": 128, "class_dropout": 0.1},
        "optimizer": {"lr": lr, "weight_decay": 0.1, "ema_decay": 0.99},
        "train": {"steps": 100, "batch_size": 16, "log_every": 50, "checkpoint_every": 50, "keep_checkpoints": 2},
        "eval": {"steps": list(steps), "num_samples": num_samples, "batch_size": 100, "cfg_scale": 1.0,
                 "grid_size": grid_size, "metric": metric},
        "resources": {"cpus": 1, "gpus": 0, "tpus": 0, "hosts": 1},
        "output": {"workdir": "runs"},
    }


def spec_hash(spec: dict) -> str:
    import hashlib

    content = {k: spec[k] for k in ("seed", "data", "model", "method", "optimizer", "train")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def make_record(workdir: Path, spec: dict, values: dict[int, float] | None = None, *, status: str = "finished",
                history_steps=(50, 100), train_step: int = 100, extra_evals: list[dict] | None = None,
                smoke: bool = False, grids: bool = True, floor: float | None = None,
                spreads: dict[int, float] | None = None, compute: float | None = None,
                curve: dict[int, list[tuple[float, float]]] | None = None) -> dict:
    """A run record with a loss history, evaluations {num_steps: value} at `train_step`, and sample grids
    (written with the project's own save_grid) whose first cell is a known image (see first_image). Optional
    evidence for comparisons: the metric's noise `floor`, each value's bootstrap std (`spreads`, by steps),
    the run's total training FLOPs (`compute`) and its convergence `curve` {steps: [(FLOPs, value)]}."""
    from shortcut.images import save_grid

    h = spec_hash(spec)
    rundir = Path(workdir) / spec["name"] / h[:12]
    rundir.mkdir(parents=True, exist_ok=True)
    size = spec["data"]["image_size"] // (spec["data"]["latent"]["downsample"] if spec["data"]["latent"] else 1)
    ch = spec["data"]["latent"]["channels"] if spec["data"]["latent"] else spec["data"]["channels"]
    samples = {}
    for n in spec["eval"]["steps"]:
        info = {"network_evaluations": n}
        if grids:
            rng = np.random.default_rng(n)
            images = rng.uniform(-1, 1, (spec["eval"]["grid_size"], size, size, ch)).astype(np.float32)
            images[0] = first_image(n, size, ch)
            info["grid"] = str(save_grid(images, rundir / "samples" / f"steps_{n}.png"))
        samples[str(n)] = info
    evaluation = list(extra_evals or [])
    for n, v in (values or {}).items():
        evaluation.append({"train_step": train_step, "num_steps": n, "metric": spec["eval"]["metric"], "value": v,
                           "num_samples": spec["eval"]["num_samples"], "cfg_scale": 1.0, "seed": spec["seed"] + 1,
                           "params": "ema", "feature_net": "digits_mlp", "feature_net_sha256": "ab" * 32,
                           "reference_stats_sha256": "cd" * 32, "class_accuracy": 0.5,
                           **({"noise_floor": {"value": floor, "std": 0.1, "draws": 10, "source": "synthetic"}}
                              if floor is not None else {}),
                           **({"bootstrap_std": spreads[n]} if spreads and n in spreads else {})})
    history = [{"step": s, "loss": 1.0 / s, "loss_flow": 0.5 / s, "loss_bootstrap": 0.25 / s, "grad_norm": 1.5,
                "lr": 1e-3, "steps_per_sec": 10.0} for s in history_steps]
    record = {
        "name": spec["name"], "spec_hash": h, "smoke": smoke, "status": status, "data": spec["data"]["dataset"],
        "git_commit": "0123456789abcdef-dirty", "started": "2025-01-01T00:00:00+00:00",
        "finished": "2025-01-01T00:10:00+00:00", "run_dir": str(rundir), "devices": ["cpu:0"],
        "versions": {"jax": "x"}, "spec": spec, "num_params": 12345,
        "timings": {"setup_s": 1.0, "train_s": 10.0}, "resumed_from": None,
        "train": {"steps": spec["train"]["steps"], "final": history[-1] if history else None, "history": history},
        "samples": samples, "evaluation": evaluation,
    }
    if compute is not None:
        record["compute"] = {"total_flops": compute, "train_flops": compute, "steps": spec["train"]["steps"]}
    if curve:
        record["curve"] = [{"train_step": i, "num_steps": n, "metric": spec["eval"]["metric"], "value": v,
                            "compute_flops": c} for n, points in curve.items() for i, (c, v) in enumerate(points)]
    (rundir / "run.json").write_text(json.dumps(record, indent=2))
    return record


def first_image(n: int, size: int, ch: int) -> np.ndarray:
    """A recognisable first sample for step count n: a gradient whose brightness depends on n."""
    ramp = np.linspace(-1, 1, size * size, dtype=np.float32).reshape(size, size, 1)
    return np.clip(ramp * 0.5 + (np.log2(n) / 7 - 0.5), -1, 1).repeat(ch, axis=-1)
