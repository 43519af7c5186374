"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``, "sd-vae-ft-mse") in Flax, for latent-space training.

* :mod:`model`: the Flax modules, ``VAEConfig`` (``SD_VAE_FT_MSE``, ``VAEConfig.smoke()``) and ``DiagonalGaussian``.
* :mod:`weights`: find, sha256-verify and convert diffusers weight files (safetensors or .bin; no torch).
* :mod:`codec`: ``LatentCodec``, batched and sharded image <-> scaled-latent conversion.
"""

from shortcut.vae.codec import LatentCodec
from shortcut.vae.model import (
    SD_VAE_FT_MSE,
    AutoencoderKL,
    Decoder,
    DiagonalGaussian,
    Encoder,
    VAEConfig,
    init_params,
)
from shortcut.vae.weights import (
    KNOWN_VAE_WEIGHTS,
    VAEWeightsError,
    load_vae,
    load_vae_weights,
    params_from_state_dict,
    random_vae,
    read_state_dict,
    resolve_vae_weights_path,
    state_dict_from_params,
)

__all__ = [
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "KNOWN_VAE_WEIGHTS",
    "LatentCodec",
    "SD_VAE_FT_MSE",
    "VAEConfig",
    "VAEWeightsError",
    "init_params",
    "load_vae",
    "load_vae_weights",
    "params_from_state_dict",
    "random_vae",
    "read_state_dict",
    "resolve_vae_weights_path",
    "state_dict_from_params",
]
