"""Latent-space training data (shortcut/data/latents.py): on-the-fly encoding and the pre-encoded dataset."""

from __future__ import annotations

import numpy as np
import pytest

from shortcut.data import make_mock_iterator
from shortcut.data.latents import EncodedIterator, make_latent_iterator, pre_encode, read_provenance
from shortcut.spec_files import load_spec
from shortcut.vae import LatentCodec, VAEConfig, random_vae

SCALE = 0.18215


@pytest.fixture(scope="module")
def codec():
    module, params = random_vae(VAEConfig.smoke(), seed=0)
    return LatentCodec(module, params, scale=SCALE, batch_size=4, description="random test VAE")


def _spec(flip: bool):
    return load_spec("celeba_ditb_shortcut", ["data.image_size=32", f"data.flip={str(flip).lower()}"])


def _images(n_batches: int, batch: int = 4):
    it = make_mock_iterator(image_shape=(32, 32, 3), num_classes=0, batch_size=batch, seed=3)
    return [next(it) for _ in range(n_batches)]


def test_on_the_fly_encoding_is_the_vae_posterior_sample_and_resumes(codec):
    images = make_mock_iterator(image_shape=(32, 32, 3), num_classes=0, batch_size=4, seed=1)
    it = EncodedIterator(images, codec, seed=5)
    assert it.info.image_shape == (4, 4, 4)
    first = next(it)
    raw = make_mock_iterator(image_shape=(32, 32, 3), num_classes=0, batch_size=4, seed=1)
    mean, logvar = codec.moments(next(raw)["image"])
    # a posterior sample: within a few std of the mean, scaled
    z = first["image"] / SCALE
    assert np.all(np.abs(z - mean) <= 6 * np.exp(0.5 * logvar) + 1e-5)
    assert not np.allclose(z, mean)
    state = it.get_state()
    second = next(it)
    again = EncodedIterator(make_mock_iterator(image_shape=(32, 32, 3), num_classes=0, batch_size=4, seed=1),
                            codec, seed=5)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["image"], second["image"])  # same batch, same posterior noise


@pytest.mark.parametrize("flip", [False, True])
def test_pre_encoded_dataset_stores_moments_and_trains_from_fresh_samples(codec, tmp_path, flip):
    spec = _spec(flip)
    batches = _images(3)
    directory = pre_encode(spec, codec, tmp_path / "lat", images=batches, log=lambda s: None)
    prov = read_provenance(directory)
    assert prov["num_examples"] == 12 and prov["latent_shape"] == [4, 4, 4] and prov["flip"] is flip
    assert pre_encode(spec, codec, directory, images=None, log=lambda s: None) == directory  # once only

    def make():
        return make_latent_iterator(directory, scale=SCALE, batch_size=4, seed=0, flip=flip, num_classes=0,
                                    shuffle_buffer=12)

    it = make()
    seen = np.concatenate([next(it)["image"] for _ in range(3)])  # one epoch
    assert seen.shape == (12, 4, 4, 4) and seen.dtype == np.float32
    all_images = np.concatenate([b["image"] for b in batches])
    mean, logvar = codec.moments(all_images)
    candidates = [mean]
    if flip:
        candidates.append(codec.moments(all_images[:, :, ::-1])[0])
    std = np.exp(0.5 * logvar).max()
    # every sample is a posterior sample of one of the stored images (or of its mirror)
    for z in seen / SCALE:
        assert min(np.abs(z - c).max() for m in candidates for c in m) < 6 * std + 1e-4
    state = it.get_state()
    following = next(it)["image"]
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], following)
    np.testing.assert_array_equal(next(make())["image"], seen[:4])  # deterministic from the seed
