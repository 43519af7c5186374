"""The Flax SD-VAE: shapes, diffusers weight files (names, layouts, lookup, hashes) and the LatentCodec.

Uses the reduced-width smoke config at small image sizes; the match against diffusers' own model is
in test_vae_reference.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from shortcut.spec import LatentSpec
from shortcut.vae import (
    KNOWN_VAE_WEIGHTS,
    SD_VAE_FT_MSE,
    DiagonalGaussian,
    LatentCodec,
    VAEConfig,
    VAEWeightsError,
    load_vae,
    load_vae_weights,
    params_from_state_dict,
    random_vae,
    resolve_vae_weights_path,
    state_dict_from_params,
)
from shortcut.vae.model import param_shapes

SMOKE = VAEConfig.smoke()
SAFETENSORS, BIN = (w.filename for w in KNOWN_VAE_WEIGHTS)


@pytest.fixture(scope="module")
def smoke_vae():
    return random_vae(SMOKE, seed=0)


@pytest.fixture(scope="module")
def state_dict(smoke_vae):
    return state_dict_from_params(smoke_vae[1])


@pytest.fixture(autouse=True)
def _no_weights_anywhere(tmp_path, monkeypatch):
    """Every test starts with an empty weights dir and no $SHORTCUT_VAE_WEIGHTS."""
    monkeypatch.setenv("SHORTCUT_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("SHORTCUT_VAE_WEIGHTS", raising=False)


def _assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


# --------------------------------------------------------------------------- model


def test_sd_vae_ft_mse_structure():
    shapes = jax.tree_util.tree_leaves(param_shapes(SD_VAE_FT_MSE))
    # The published diffusers file holds 248 tensors, 83,653,863 parameters.
    assert len(shapes) == 248
    assert sum(int(np.prod(s.shape)) for s in shapes) == 83_653_863
    assert SD_VAE_FT_MSE.downsample_factor == 8 and SD_VAE_FT_MSE.latent_shape((256, 256)) == (32, 32, 4)
    assert VAEConfig.SD_VAE_FT_MSE is SD_VAE_FT_MSE
    assert (SMOKE.downsample_factor, SMOKE.latent_channels) == (8, 4)
    with pytest.raises(ValueError, match="multiple"):
        SMOKE.latent_shape((30, 32))


def test_smoke_vae_shapes_at_256(smoke_vae):
    module, params = smoke_vae
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 256, 256, 3)), jnp.float32)
    posterior = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, x)
    assert posterior.mean.shape == posterior.logvar.shape == (1, 32, 32, 4)
    image = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, posterior.mode())
    assert image.shape == (1, 256, 256, 3) and image.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(image)))


def test_diagonal_gaussian():
    moments = jnp.concatenate([jnp.full((2, 3, 3, 4), 0.5), jnp.full((2, 3, 3, 4), -100.0)], axis=-1)
    g = DiagonalGaussian.from_moments(moments)
    assert float(g.logvar.min()) == -30.0  # clipped like diffusers
    np.testing.assert_allclose(g.std, np.exp(-15.0), rtol=1e-6)
    np.testing.assert_array_equal(g.mode(), g.mean)
    g = DiagonalGaussian(jnp.zeros((4096,)), jnp.full((4096,), 2 * np.log(3.0)))
    s = np.asarray(g.sample(jax.random.key(0)))
    assert abs(s.std() - 3.0) < 0.15 and abs(s.mean()) < 0.15
    np.testing.assert_array_equal(s, g.sample(jax.random.key(0)))


# --------------------------------------------------------------------------- weight files


def test_state_dict_uses_diffusers_names_and_layouts(state_dict, smoke_vae):
    params = smoke_vae[1]
    assert len(state_dict) == len(jax.tree_util.tree_leaves(params))
    w = state_dict["encoder.down_blocks.1.resnets.0.conv1.weight"]
    assert w.shape == (8, 8, 3, 3)  # OIHW (smoke widths 8, 8, 16, 16)
    np.testing.assert_array_equal(
        w, np.transpose(params["encoder"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"], (3, 2, 0, 1)))
    assert state_dict["encoder.down_blocks.2.resnets.0.conv_shortcut.weight"].shape == (16, 8, 1, 1)
    q = state_dict["decoder.mid_block.attentions.0.to_q.weight"]  # (out, in)
    np.testing.assert_array_equal(q, params["decoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].T)
    for name in ("encoder.mid_block.attentions.0.to_out.0.bias", "decoder.up_blocks.0.upsamplers.0.conv.weight",
                 "encoder.down_blocks.0.downsamplers.0.conv.bias", "decoder.conv_norm_out.weight",
                 "quant_conv.weight", "post_quant_conv.bias"):
        assert name in state_dict, name


def test_safetensors_round_trip_is_exact(tmp_path, smoke_vae, state_dict):
    path = tmp_path / SAFETENSORS
    save_file(state_dict, str(path))
    loaded = load_vae_weights(SMOKE, path, verify=False)
    _assert_same_tree(loaded.params, smoke_vae[1])
    assert loaded.path == path and not loaded.verified and len(loaded.sha256) == 64
    module, params = load_vae(SMOKE, tmp_path, verify=False)  # a directory works too
    assert module.config == SMOKE
    _assert_same_tree(params, smoke_vae[1])


def test_legacy_attention_names_and_conv_shaped_attention_weights(state_dict, smoke_vae):
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for name, value in state_dict.items():
        for new, old in renames.items():
            if f"attentions.0.{new}." in name:
                name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                if name.endswith("weight"):
                    value = value[:, :, None, None]  # stored as a 1x1 conv
        legacy[name] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    _assert_same_tree(params_from_state_dict(legacy, SMOKE), smoke_vae[1])


def test_unexpected_missing_and_misshaped_tensors_are_errors(state_dict):
    with pytest.raises(VAEWeightsError, match=r"unexpected \['encoder.extra.weight'\]"):
        params_from_state_dict({**state_dict, "encoder.extra.weight": np.zeros(3, np.float32)}, SMOKE)
    partial = {k: v for k, v in state_dict.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(VAEWeightsError, match="1 missing.*decoder/conv_out/bias"):
        params_from_state_dict(partial, SMOKE)
    bad = {**state_dict, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(VAEWeightsError, match="wrong shape.*quant_conv.weight"):
        params_from_state_dict(bad, SMOKE)
    with pytest.raises(VAEWeightsError, match="missing"):  # the wrong architecture
        params_from_state_dict(state_dict, SD_VAE_FT_MSE)


def test_bin_file_written_by_torch(tmp_path, smoke_vae, state_dict):
    torch = pytest.importorskip("torch", reason="writing a .bin (torch.save zip) needs torch; reading it does not")
    path = tmp_path / BIN
    torch.save({k: torch.tensor(v) for k, v in state_dict.items()}, str(path))
    _assert_same_tree(load_vae_weights(SMOKE, path, verify=False).params, smoke_vae[1])


def test_lookup_order(tmp_path, monkeypatch, state_dict):
    default_dir = tmp_path / "weights" / "sd-vae-ft-mse"
    default_dir.mkdir(parents=True)
    save_file(state_dict, str(default_dir / BIN))  # content decides the reader, not the name
    assert resolve_vae_weights_path() == default_dir / BIN
    save_file(state_dict, str(default_dir / SAFETENSORS))
    assert resolve_vae_weights_path() == default_dir / SAFETENSORS  # safetensors preferred
    other = tmp_path / "other"
    other.mkdir()
    save_file(state_dict, str(other / SAFETENSORS))
    monkeypatch.setenv("SHORTCUT_VAE_WEIGHTS", str(other))
    assert resolve_vae_weights_path() == other / SAFETENSORS
    monkeypatch.setenv("SHORTCUT_VAE_WEIGHTS", str(other / SAFETENSORS))
    assert resolve_vae_weights_path() == other / SAFETENSORS
    assert resolve_vae_weights_path(default_dir / BIN) == default_dir / BIN  # explicit path first


def test_missing_weights_error_says_where_and_what(tmp_path, monkeypatch):
    with pytest.raises(VAEWeightsError) as e:
        load_vae()
    msg = str(e.value)
    default_dir = tmp_path / "weights" / "sd-vae-ft-mse"
    assert str(default_dir / SAFETENSORS) in msg and "sha256" in msg
    assert KNOWN_VAE_WEIGHTS[0].sha256 in msg and "huggingface-cli download stabilityai/sd-vae-ft-mse" in msg
    assert isinstance(e.value, FileNotFoundError)
    missing = tmp_path / "nowhere" / SAFETENSORS
    with pytest.raises(VAEWeightsError, match="sha256") as e:
        load_vae(path=missing)
    assert str(missing) in str(e.value)
    monkeypatch.setenv("SHORTCUT_VAE_WEIGHTS", str(tmp_path))
    with pytest.raises(VAEWeightsError, match="directory without VAE weights") as e:
        load_vae()
    assert str(tmp_path / SAFETENSORS) in str(e.value)


def test_wrong_hash_is_an_error_unless_verify_is_off(tmp_path, state_dict):
    path = tmp_path / SAFETENSORS
    save_file(state_dict, str(path))
    with pytest.raises(VAEWeightsError, match="sha256.*not a published stabilityai/sd-vae-ft-mse.*verify=False"):
        load_vae_weights(SD_VAE_FT_MSE, path)
    with pytest.raises(ValueError, match="verify=False"):
        load_vae_weights(SMOKE, path, verify=True)
    load_vae_weights(SMOKE, path, verify=False)
    path.write_bytes(b"not a weights file")
    with pytest.raises(VAEWeightsError, match="cannot read"):
        load_vae_weights(SMOKE, path, verify=False)


def test_config_json_next_to_the_weights_must_match(tmp_path, state_dict):
    save_file(state_dict, str(tmp_path / SAFETENSORS))
    cfg = {"_class_name": "AutoencoderKL", "block_out_channels": list(SMOKE.block_out_channels),
           "norm_num_groups": SMOKE.norm_num_groups,
           "latent_channels": 4, "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    load_vae_weights(SMOKE, tmp_path, verify=False)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "latent_channels": 16}))
    with pytest.raises(VAEWeightsError, match="latent_channels=16 .expected 4."):
        load_vae_weights(SMOKE, tmp_path, verify=False)


# --------------------------------------------------------------------------- codec


@pytest.fixture(scope="module")
def codec(smoke_vae):
    return LatentCodec(*smoke_vae, scale=0.18215, batch_size=4)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)


def test_codec_shapes_scale_and_clipping(codec, smoke_vae, images):
    module, params = smoke_vae
    posterior = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, images)
    mean = codec.encode(images, mode=True)
    assert mean.shape == (6, 4, 4, 4) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, np.asarray(posterior.mean) * 0.18215, rtol=1e-5, atol=1e-6)
    latents = codec.encode(images, jax.random.key(0))
    assert latents.shape == (6, 4, 4, 4) and not np.allclose(latents, mean)
    decoded = codec.decode(latents)
    assert decoded.shape == (6, 32, 32, 3) and decoded.min() >= -1 and decoded.max() <= 1
    expected = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, latents / 0.18215)
    expected = np.clip(np.asarray(expected), -1, 1)
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-5)
    assert codec.encode(images[:0], mode=True).shape == (0, 4, 4, 4)
    with pytest.raises(ValueError, match="key"):
        codec.encode(images)
    with pytest.raises(ValueError, match=r"\(N, H, W, 4\)"):
        codec.decode(images)


def test_codec_chunking_and_determinism(codec, smoke_vae, images):
    one_batch = LatentCodec(*smoke_vae, batch_size=8)
    key = jax.random.key(3)
    sampled = codec.encode(images, key)  # chunks of 4, 4 (last one padded)
    np.testing.assert_allclose(sampled, one_batch.encode(images, key), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(codec.encode(images, mode=True), one_batch.encode(images, mode=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(codec.decode(sampled), one_batch.decode(sampled), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sampled, codec.encode(images, key))
    np.testing.assert_array_equal(codec.encode(images, 3), codec.encode(images, 3))  # an int seed
    assert not np.allclose(sampled, codec.encode(images, jax.random.key(4)))
    # image i's noise depends on (key, i) only: a prefix of the batch gets the same latents
    np.testing.assert_allclose(codec.encode(images[:3], key), sampled[:3], rtol=1e-5, atol=1e-6)


def test_codec_bfloat16(smoke_vae, images, codec):
    bf16 = LatentCodec(*smoke_vae, dtype="bfloat16", batch_size=4)
    assert bf16.module.dtype == jnp.bfloat16
    mean32, mean16 = codec.encode(images, mode=True), bf16.encode(images, mode=True)
    assert mean16.dtype == np.float32
    assert np.max(np.abs(mean16 - mean32)) < 0.05 * np.max(np.abs(mean32))


def test_codec_from_spec(tmp_path):
    spec = LatentSpec()
    smoke = LatentCodec.from_spec(spec, smoke=True, batch_size=2)
    assert "NOT sd-vae-ft-mse" in smoke.description and smoke.weights_sha256 is None
    assert smoke.scale == spec.scale and smoke.config == SMOKE
    assert smoke.encode(np.zeros((1, 16, 16, 3), np.float32), mode=True).shape == (1, 2, 2, 4)
    _assert_same_tree(smoke._moments.variables["params"], random_vae(SMOKE, seed=0)[1])  # seeded
    with pytest.raises(VAEWeightsError, match="sha256"):
        LatentCodec.from_spec(spec, smoke=False)
    with pytest.raises(ValueError, match="downsample"):
        LatentCodec.from_spec(LatentSpec(downsample=4), smoke=True)
