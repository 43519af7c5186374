"""Our Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL, on the same random weights.

The reference model is built from the sd-vae-ft-mse config (and from the smoke config), every
parameter is randomised (including GroupNorm affine parameters and biases, so a wrong mapping of
any of them shows), its state dict is written with safetensors and read back by our torch-free
loader. Both models then see the same inputs. Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference VAE needs torch (`make test` installs the CPU wheel)")
pytest.importorskip("diffusers", reason="the reference VAE is diffusers' AutoencoderKL (pip install diffusers)")
pytest.importorskip("safetensors", reason="the reference weights are written with safetensors")

import jax  # noqa: E402

from shortcut.vae.model import SD_VAE_FT_MSE, AutoencoderKL, VAEConfig  # noqa: E402
from shortcut.vae.weights import load_vae_weights  # noqa: E402

TOLERANCE = 1e-4  # max |ours - reference| / max |reference|
RELATIVE_ERRORS: dict[str, float] = {}


def _diffusers_autoencoder_kl():
    # AutoencoderKL needs nothing from torchvision, but diffusers imports it eagerly when it is
    # installed, and a torchvision built for another torch fails at import. Tell diffusers it is absent.
    import diffusers.utils.import_utils as import_utils

    import_utils._torchvision_available = False
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    return TorchAutoencoderKL


def reference_model(config: VAEConfig, seed: int):
    torch.manual_seed(seed)
    n = len(config.block_out_channels)
    model = _diffusers_autoencoder_kl()(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, act_fn=config.act_fn, sample_size=config.sample_size,
        scaling_factor=config.scaling_factor,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # GroupNorm scale
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _rel(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def compare(config: VAEConfig, size: int, label: str, tmp_path, batch: int = 2) -> None:
    from safetensors.torch import save_file

    ref = reference_model(config, seed=0)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    params = load_vae_weights(config, path, verify=False).params
    ours = AutoencoderKL(config)

    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (batch, config.in_channels, size, size)).astype(np.float32)
    f = config.downsample_factor
    z = rng.standard_normal((batch, config.latent_channels, size // f, size // f)).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_logvar = posterior.mean.numpy(), posterior.logvar.numpy()
        ref_image = ref.decode(torch.from_numpy(z)).sample.numpy()

    def nhwc(a):
        return np.transpose(a, (0, 2, 3, 1))

    post = jax.jit(lambda p, x: ours.apply({"params": p}, x, method="encode"))(params, nhwc(x))
    image = jax.jit(lambda p, z: ours.apply({"params": p}, z, method="decode"))(params, nhwc(z))
    errors = {
        "encoder mean": _rel(post.mean, nhwc(ref_mean)),
        "encoder logvar": _rel(post.logvar, nhwc(ref_logvar)),
        "decoder output": _rel(image, nhwc(ref_image)),
    }
    for what, err in errors.items():
        RELATIVE_ERRORS[f"{label} {size}x{size}: {what}"] = err
        print(f"[vae reference] {label} {size}x{size} {what}: max|diff|/max|ref| = {err:.2e}")
    assert all(err < TOLERANCE for err in errors.values()), errors


def test_smoke_config_matches_diffusers(tmp_path):
    compare(VAEConfig.smoke(), 64, "smoke", tmp_path)


def test_sd_vae_ft_mse_architecture_matches_diffusers(tmp_path):
    compare(SD_VAE_FT_MSE, 64, "sd-vae-ft-mse", tmp_path)


def test_sd_vae_ft_mse_architecture_matches_diffusers_at_256(tmp_path):
    compare(SD_VAE_FT_MSE, 256, "sd-vae-ft-mse", tmp_path, batch=1)
