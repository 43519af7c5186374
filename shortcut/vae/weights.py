"""Locate, verify and load diffusers-format ``AutoencoderKL`` weights into Flax params (no torch).

Accepted files, as published in the Hugging Face repo ``stabilityai/sd-vae-ft-mse``:

* ``diffusion_pytorch_model.safetensors`` (read with ``safetensors.numpy``), preferred;
* ``diffusion_pytorch_model.bin`` (a ``torch.save`` zip, read by
  :mod:`shortcut.evaluation.torch_pickle`, which builds nothing but arrays).

Lookup order: an explicit path (a file, or a diffusers model directory holding one of the files);
``$SHORTCUT_VAE_WEIGHTS`` (same); then ``<weights dir>/sd-vae-ft-mse/<file>``, where the weights dir
is ``$SHORTCUT_WEIGHTS_DIR`` or ``~/.cache/shortcut-models`` (shared with the FID Inception weights).
Nothing is downloaded at run time.

With ``verify=True`` (the default) the file's sha256 must be that of one of the two published files.
The hashes are the Git LFS object ids (sha256) of the files at revision
31f26fdeee1355a5c34592e401dd41e45d25a493; see ``KNOWN_VAE_WEIGHTS`` for sizes and sources. A custom fine-tune
loads with ``verify=False``; every parameter is still checked by name and shape.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from shortcut.errors import ShortcutError
from shortcut.evaluation.inception_weights import KnownWeights, default_weights_dir, sha256_file
from shortcut.vae.model import SD_VAE_FT_MSE, AutoencoderKL, VAEConfig, init_params, param_shapes

HF_REPO = "stabilityai/sd-vae-ft-mse"
HF_REVISION = "31f26fdeee1355a5c34592e401dd41e45d25a493"
_HF_FILE_URL = f"https://huggingface.co/{HF_REPO}/blob/{HF_REVISION}/" + "{}"

SAFETENSORS_WEIGHTS = KnownWeights(
    filename="diffusion_pytorch_model.safetensors",
    sha256="a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815",
    size=334_643_276,
    source=_HF_FILE_URL.format("diffusion_pytorch_model.safetensors") + " (Git LFS oid)",
)
BIN_WEIGHTS = KnownWeights(
    filename="diffusion_pytorch_model.bin",
    sha256="1b4889b6b1d4ce7ae320a02dedaeff1780ad77d415ea0d744b476155c6377ddc",
    size=334_707_217,
    source=_HF_FILE_URL.format("diffusion_pytorch_model.bin") + " (Git LFS oid)",
)
KNOWN_VAE_WEIGHTS = (SAFETENSORS_WEIGHTS, BIN_WEIGHTS)
KNOWN_VAE_SHA256 = {w.sha256: w for w in KNOWN_VAE_WEIGHTS}
ENV_FILE = "SHORTCUT_VAE_WEIGHTS"
SUBDIR = "sd-vae-ft-mse"


class VAEWeightsError(ShortcutError, FileNotFoundError):
    """The VAE weights file is missing, unreadable, not the expected one, or does not fit the model."""


def default_vae_dir() -> Path:
    return default_weights_dir() / SUBDIR


def how_to_provide(looked_at: list[Path] | None = None) -> str:
    d = default_vae_dir()
    lines = []
    if looked_at:
        lines.append("Looked for: " + ", ".join(str(p) for p in looked_at) + ".")
    lines.append(
        f"Put one of these files (from the Hugging Face repo {HF_REPO}) in {d} "
        f"(or set ${ENV_FILE} to the file or to a diffusers model directory holding it):"
    )
    for w in KNOWN_VAE_WEIGHTS:
        lines.append(f"  {w.filename}  sha256 {w.sha256}  ({w.size:,} bytes)  from {w.source}")
    lines.append(
        "On a machine with network access: huggingface-cli download "
        f"{HF_REPO} {SAFETENSORS_WEIGHTS.filename} --revision {HF_REVISION} --local-dir {d}"
    )
    lines.append("Nothing is downloaded at run time.")
    return "\n".join(lines)


def _in_directory(d: Path) -> list[Path]:
    return [d / w.filename for w in KNOWN_VAE_WEIGHTS]


def resolve_vae_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use (see the module docstring), or raise VAEWeightsError saying where to put one."""
    if path is not None:
        origin, p = "", Path(path).expanduser()
    elif os.environ.get(ENV_FILE):
        origin, p = f"${ENV_FILE}=", Path(os.environ[ENV_FILE]).expanduser()
    else:
        candidates = _in_directory(default_vae_dir())
        for c in candidates:
            if c.is_file():
                return c
        raise VAEWeightsError("SD-VAE weights not found.\n" + how_to_provide(candidates))
    if p.is_file():
        return p
    if p.is_dir():
        candidates = _in_directory(p)
        for c in candidates:
            if c.is_file():
                return c
        raise VAEWeightsError(f"{origin}{p} is a directory without VAE weights.\n" + how_to_provide(candidates))
    raise VAEWeightsError(f"SD-VAE weights file {origin}{p} does not exist.\n" + how_to_provide([p]))


# --------------------------------------------------------------------------- reading and conversion

# Attention names of older diffusers versions, which the published sd-vae-ft-mse files still use.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A diffusers weights file as {name: float32 array} (safetensors or torch zip; decided by content)."""
    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            from shortcut.evaluation.torch_pickle import load_torch_state_dict

            sd = load_torch_state_dict(p)
        else:
            from safetensors.numpy import load_file

            sd = load_file(str(p))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file; keep the cause
        raise VAEWeightsError(f"{p}: cannot read it as a safetensors or torch state dict ({e})") from e
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _flax_path(name: str) -> tuple[tuple[str, ...], str]:
    """'encoder.down_blocks.0.resnets.1.conv1.weight' -> (('encoder', 'down_blocks_0', 'resnets_1', 'conv1'), 'weight')."""
    *mods, leaf = name.split(".")
    if len(mods) >= 3 and mods[-3] == "attentions" and mods[-1] in _LEGACY_ATTENTION:
        mods = mods[:-1] + _LEGACY_ATTENTION[mods[-1]].split(".")
    out: list[str] = []
    for m in mods:
        if m.isdigit() and out:
            out[-1] = f"{out[-1]}_{m}"
        else:
            out.append(m)
    return tuple(out), leaf


def params_from_state_dict(sd: dict[str, np.ndarray], config: VAEConfig = SD_VAE_FT_MSE,
                           origin: str = "state dict") -> dict:
    """diffusers ``AutoencoderKL`` state dict (numpy) -> Flax params; every param must be present, once.

    Conv weights OIHW -> HWIO; linear (out, in) -> (in, out), also from 1x1-conv (out, in, 1, 1)
    attention weights; norm weight -> scale. Legacy attention names are accepted.
    """
    expected = {tuple(k.key for k in p): tuple(leaf.shape)
                for p, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    sources: dict[tuple[str, ...], str] = {}
    unexpected: list[str] = []
    for name, value in sd.items():
        mods, leaf = _flax_path(name)
        if leaf == "bias":
            key, arr = (*mods, "bias"), value
        elif leaf == "weight" and (*mods, "scale") in expected:
            key, arr = (*mods, "scale"), value
        elif leaf == "weight" and (*mods, "kernel") in expected:
            key = (*mods, "kernel")
            if len(expected[key]) == 2:  # Dense
                if value.ndim == 4 and value.shape[2:] == (1, 1):
                    value = value[:, :, 0, 0]
                arr = value.T if value.ndim == 2 else value
            else:
                arr = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
        else:
            unexpected.append(name)
            continue
        if key not in expected:
            unexpected.append(name)
            continue
        if key in flat:
            raise VAEWeightsError(f"{origin}: {sources[key]} and {name} both give {'/'.join(key)}")
        flat[key], sources[key] = np.ascontiguousarray(arr, np.float32), name
    missing = sorted("/".join(k) for k in expected if k not in flat)
    if missing or unexpected:
        raise VAEWeightsError(
            f"{origin}: does not match the AutoencoderKL {config}: "
            f"{len(missing)} missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"{len(unexpected)} unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [f"{sources[k]} {flat[k].shape} (expected {shape} as {'/'.join(k)})"
             for k, shape in expected.items() if flat[k].shape != shape]
    if wrong:
        raise VAEWeightsError(f"{origin}: {len(wrong)} tensors have the wrong shape: " + "; ".join(wrong[:5]))
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: dict) -> dict[str, np.ndarray]:
    """Flax params -> diffusers state dict (current names: to_q/to_k/to_v/to_out.0), float32 numpy."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        *mods, leaf_name = (k.key for k in path)
        names = []
        for m in mods:
            head, _, tail = m.rpartition("_")
            names.extend([head, tail] if tail.isdigit() and head else [m])
        arr = np.asarray(leaf, np.float32)
        if leaf_name == "kernel":
            arr = arr.T if arr.ndim == 2 else np.transpose(arr, (3, 2, 0, 1))
            leaf_name = "weight"
        elif leaf_name == "scale":
            leaf_name = "weight"
        out[".".join([*names, leaf_name])] = np.ascontiguousarray(arr)
    return out


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedVAEWeights:
    params: dict
    path: Path
    sha256: str
    verified: bool  # True: the file is one of the published sd-vae-ft-mse files


def _check_config_json(weights_file: Path, config: VAEConfig) -> None:
    """If the weights sit in a diffusers model directory, its config.json must describe ``config``."""
    cfg_file = weights_file.parent / "config.json"
    if not cfg_file.is_file():
        return
    try:
        found = VAEConfig.from_diffusers_config(json.loads(cfg_file.read_text()))
    except (ValueError, TypeError) as e:
        raise VAEWeightsError(f"{cfg_file}: not a supported AutoencoderKL config ({e})") from e
    arch = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
            "norm_num_groups")
    diff = {a: (getattr(found, a), getattr(config, a)) for a in arch if getattr(found, a) != getattr(config, a)}
    if diff:
        raise VAEWeightsError(f"{cfg_file} describes another architecture: " +
                              ", ".join(f"{a}={f} (expected {e})" for a, (f, e) in diff.items()))


def load_vae_weights(config: VAEConfig = SD_VAE_FT_MSE, path: str | os.PathLike | None = None,
                     verify: bool = True) -> LoadedVAEWeights:
    """Find, verify (sha256, unless ``verify=False``) and convert VAE weights into Flax params."""
    p = resolve_vae_weights_path(path)
    sha = sha256_file(p)
    if verify:
        if config != SD_VAE_FT_MSE:
            raise ValueError("verify=True checks for the sd-vae-ft-mse files; pass verify=False for another config")
        if sha not in KNOWN_VAE_SHA256:
            raise VAEWeightsError(
                f"{p} has sha256 {sha} ({p.stat().st_size:,} bytes), which is not a published "
                f"{HF_REPO} weights file: wrong, corrupt or truncated. For a custom fine-tune pass verify=False.\n"
                + how_to_provide()
            )
    _check_config_json(p, config)
    params = params_from_state_dict(read_state_dict(p), config, origin=str(p))
    return LoadedVAEWeights(params, p, sha, sha in KNOWN_VAE_SHA256)


def load_vae(config: VAEConfig = SD_VAE_FT_MSE, path: str | os.PathLike | None = None,
             verify: bool = True) -> tuple[AutoencoderKL, dict]:
    """(module, params) of the pretrained VAE; see :func:`load_vae_weights`."""
    return AutoencoderKL(config), load_vae_weights(config, path, verify).params


def random_vae(config: VAEConfig | None = None, seed: int = 0) -> tuple[AutoencoderKL, dict]:
    """(module, params) with random weights (Flax default initialisers): smoke tests and benchmarks only."""
    config = config if config is not None else VAEConfig.smoke()
    return AutoencoderKL(config), init_params(config, seed)
