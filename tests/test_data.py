"""Tests of the input pipelines (shortcut.data): digits, CelebA-HQ folder, ImageNet/MNIST mocks."""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tfds_mock import write_mock_metadata
from shortcut.data import (
    DatasetInfo,
    DatasetNotReadyError,
    check_dataset,
    make_mock_iterator,
    make_train_iterator,
)
from shortcut.data import pipeline, prepare
from shortcut.data.preprocess import adm_center_crop
from shortcut.data.tfenv import tf, tfds

REPO_ROOT = Path(__file__).resolve().parents[1]
N_DIGITS = 1438  # the digits' train split; 359 more are held out (stratified, shortcut/data/heldout.py)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data dir shared by the digits tests (digits is built into it on first use)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(params=["memory", "stream"])
def mode(request, monkeypatch) -> str:
    """Run a test on both pipeline paths: digits in memory, and digits streamed from records."""
    if request.param == "stream":
        monkeypatch.setattr(pipeline, "IN_MEMORY_MAX_BYTES", 0)
    return request.param


def sklearn_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """A split of scikit-learn's digits scaled as the pipeline should: [N, 8, 8, 1] in [-1, 1], labels."""
    from sklearn.datasets import load_digits

    from shortcut.data.digits import split_indices

    bunch = load_digits()
    uint8 = np.rint(bunch.images * 255 / 16).astype(np.float32)
    images = (uint8 / np.float32(127.5) - np.float32(1.0))[..., None]  # float32, as the pipeline
    idx = split_indices(split)
    return images[idx], bunch.target[idx]


def multiset(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
    return collections.Counter((im.tobytes(), int(lb)) for im, lb in zip(images, labels))


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# --- digits --------------------------------------------------------------------------------


def test_check_dataset_prepares_digits_offline(data_dir):
    info = check_dataset("digits", data_dir=data_dir)
    assert info == DatasetInfo("digits", (8, 8, 1), 10, N_DIGITS)
    assert (Path(data_dir) / "digits" / "2.0.0" / "dataset_info.json").is_file()
    assert check_dataset("digits", split="heldout", data_dir=data_dir).num_examples == 1797 - N_DIGITS
    assert check_dataset("digits", data_dir=data_dir, image_size=16).image_shape == (16, 16, 1)


def test_digits_batches(data_dir):
    it = make_train_iterator("digits", batch_size=128, seed=0, data_dir=data_dir)
    assert it.info == DatasetInfo("digits", (8, 8, 1), 10, N_DIGITS)
    batches = take(it, 5)
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (128, 8, 8, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (128,) and b["label"].dtype == np.int32
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_digits_epoch_is_the_sklearn_train_split(data_dir, mode):
    ref = multiset(*sklearn_digits())
    assert not ref & multiset(*sklearn_digits("heldout")), "no held-out digit may be trained on"
    it = make_train_iterator("digits", batch_size=N_DIGITS, seed=1, data_dir=data_dir)
    first, second = next(it), next(it)  # one whole epoch per batch
    assert multiset(first["image"], first["label"]) == ref
    assert multiset(second["image"], second["label"]) == ref
    assert not np.array_equal(first["label"], second["label"]), "epochs must be reshuffled"



def test_only_streamed_pipelines_autotune(data_dir, mode):
    """In memory there is nothing to tune, and autotuning's model thread makes deleting an iterator
    wait for its next wake-up (up to a minute at the end of every run)."""
    it = make_train_iterator("digits", batch_size=64, seed=0, data_dir=data_dir)
    assert it._dataset.options().autotune.enabled is (mode == "stream")

def test_digits_resize(data_dir):
    b = next(make_train_iterator("digits", batch_size=16, seed=0, data_dir=data_dir, image_size=16))
    assert b["image"].shape == (16, 16, 16, 1)
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0


def test_same_seed_same_batches_other_seed_differs(data_dir, mode):
    kwargs = dict(batch_size=64, data_dir=data_dir, flip=True, shuffle_buffer=256)
    a = take(make_train_iterator("digits", seed=7, **kwargs), 3)
    b = take(make_train_iterator("digits", seed=7, **kwargs), 3)
    c = take(make_train_iterator("digits", seed=8, **kwargs), 3)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_flips_only_with_flip(data_dir):
    kwargs = dict(batch_size=128, seed=3, data_dir=data_dir)
    plain = np.concatenate([b["image"] for b in take(make_train_iterator("digits", **kwargs), 4)])
    flipped = np.concatenate(
        [b["image"] for b in take(make_train_iterator("digits", flip=True, **kwargs), 4)]
    )
    mirror = plain[:, :, ::-1]
    same = np.all(flipped == plain, axis=(1, 2, 3))
    mirrored = np.all(flipped == mirror, axis=(1, 2, 3))
    symmetric = np.all(plain == mirror, axis=(1, 2, 3))
    assert np.all(same | mirrored), "a flip may only mirror an image"
    assert (mirrored & ~symmetric).sum() > 100 and (same & ~symmetric).sum() > 100
    # Without flip=True the stream is the data itself (test_digits_epoch_is_the_sklearn_train_split),
    # here: it is not mirrored relative to the same-seed stream either.
    again = np.concatenate([b["image"] for b in take(make_train_iterator("digits", **kwargs), 4)])
    np.testing.assert_array_equal(again, plain)


def test_processes_see_disjoint_shards_covering_the_data(data_dir, mode):
    seen = collections.Counter()
    sizes = []
    for p in range(2):
        n = (N_DIGITS + 1 - p) // 2  # even_splits puts the odd example on process 0
        it = make_train_iterator(
            "digits", batch_size=n, seed=0, data_dir=data_dir, process_index=p, process_count=2
        )
        b = next(it)  # exactly one epoch of this process's shard
        shard = multiset(b["image"], b["label"])
        sizes.append(sum(shard.values()))
        seen += shard
    assert sizes == [719, 719]
    assert seen == multiset(*sklearn_digits())  # disjoint and together the whole train split


def test_restore_iterator_state(data_dir, mode):
    kwargs = dict(batch_size=128, seed=5, data_dir=data_dir, flip=True, shuffle_buffer=300)
    it = make_train_iterator("digits", **kwargs)
    take(it, 12)
    state = it.get_state()
    assert isinstance(state, bytes)
    expected = take(it, 5)  # crosses the epoch boundary (14 batches per epoch)

    fresh = make_train_iterator("digits", **kwargs)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 5), expected)

    unrestored = next(make_train_iterator("digits", **kwargs))
    assert not np.array_equal(unrestored["image"], expected[0]["image"])

    other = make_train_iterator("digits", **{**kwargs, "seed": 6})
    with pytest.raises(ValueError, match="other arguments"):
        other.set_state(state)


def test_digits_batches_are_fast(data_dir):
    it = make_train_iterator("digits", batch_size=128, seed=0, data_dir=data_dir, flip=True)
    take(it, 20)
    start = time.perf_counter()
    take(it, 300)
    per_batch = (time.perf_counter() - start) / 300
    assert per_batch < 2e-3, f"{per_batch * 1e3:.2f} ms per batch"


# --- mock data -----------------------------------------------------------------------------


def test_mock_iterator():
    it = make_mock_iterator(image_shape=(16, 16, 3), num_classes=10, batch_size=4, seed=0)
    assert it.info.image_shape == (16, 16, 3) and it.info.num_classes == 10
    b = next(it)
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and np.all((0 <= b["label"]) & (b["label"] < 10))
    assert -1 <= b["image"].min() and b["image"].max() <= 1
    state = it.get_state()
    expected = take(it, 2)
    again = make_mock_iterator(image_shape=(16, 16, 3), num_classes=10, batch_size=4, seed=0)
    assert_same_batches(take(again, 1), [b])
    fresh = make_mock_iterator(image_shape=(16, 16, 3), num_classes=10, batch_size=4, seed=0)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 2), expected)
    other = make_mock_iterator(image_shape=(16, 16, 3), num_classes=10, batch_size=4, seed=1)
    assert not np.array_equal(next(other)["image"], b["image"])
    uncond = make_mock_iterator(image_shape=(8, 8, 1), num_classes=0, batch_size=3, seed=0)
    assert np.all(next(uncond)["label"] == 0)


# --- CelebA-HQ from a folder ---------------------------------------------------------------


def _write_faces(folder: Path) -> dict[str, np.ndarray]:
    """Six generated images: 4 PNG and 1 JPEG at 256x256, 1 RGBA PNG of another size."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    exact = {}
    for i in range(6):
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((256, 256), Image.BILINEAR)
        if i == 4:
            im.save(folder / f"{i:05d}.jpg", quality=95)
        elif i == 5:
            im.resize((300, 200)).convert("RGBA").save(folder / f"{i:05d}.png")
        else:
            im.save(folder / f"{i:05d}.png")
            exact[f"{i:05d}.png"] = np.asarray(im)
    return exact


def test_celebahq_from_folder(tmp_path):
    data_dir = str(tmp_path / "tfds")
    folder = Path(data_dir) / "downloads" / "manual" / "celebahq256"
    for _ in ("missing", "empty"):
        with pytest.raises(DatasetNotReadyError) as err:
            check_dataset("celebahq256", data_dir=data_dir)
        msg = str(err.value)
        assert str(folder) in msg and "no images" in msg
        assert f"python -m shortcut.data.prepare celebahq256 --data_dir {data_dir}" in msg
        folder.mkdir(parents=True, exist_ok=True)

    exact = _write_faces(folder)
    with pytest.raises(DatasetNotReadyError, match="holds 6 images"):
        make_train_iterator("celebahq256", batch_size=2, seed=0, data_dir=data_dir)

    # Run the command that the error message prints (its entry point, in this process: a
    # subprocess would spend seconds importing TensorFlow again).
    command = next(line.strip() for line in msg.splitlines() if "shortcut.data.prepare" in line)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "shortcut.data.prepare"]
    assert prepare.main(argv[3:]) == 0

    info = check_dataset("celebahq256", data_dir=data_dir)
    assert info == DatasetInfo("celebahq256", (256, 256, 3), 0, 6)

    # Native size: one epoch is the six images; the PNGs come back bit-exact.
    b = next(make_train_iterator("celebahq256", batch_size=6, seed=0, data_dir=data_dir))
    assert b["image"].shape == (6, 256, 256, 3) and np.all(b["label"] == 0)
    as_uint8 = np.rint((b["image"] + 1) * 127.5).astype(np.uint8)
    for name, ref in exact.items():
        assert any(np.array_equal(im, ref) for im in as_uint8), name

    kwargs = dict(batch_size=4, seed=0, data_dir=data_dir, image_size=32, flip=True)
    it = make_train_iterator("celebahq256", **kwargs)
    assert it.info == DatasetInfo("celebahq256", (32, 32, 3), 0, 6)
    b = next(it)
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and np.all(b["label"] == 0)
    assert -1 <= b["image"].min() and b["image"].max() <= 1

    # Restoring the streamed pipeline (shuffle buffer of encoded records included).
    state = it.get_state()
    expected = take(it, 3)
    fresh = make_train_iterator("celebahq256", **kwargs)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 3), expected)


# --- ImageNet and generic TFDS datasets (tfds.testing.mock_data) ----------------------------


def test_imagenet256_adm_crop_via_mock_data(tmp_path):
    write_mock_metadata("imagenet2012", tmp_path, num_examples=3)
    # mock_data's images have random sizes 5..49 per side, so this is the upscaling path.
    with tfds.testing.mock_data(
        num_examples=3, data_dir=str(tmp_path), policy=tfds.testing.MockPolicy.USE_FILES
    ):
        info = check_dataset("imagenet256", data_dir=str(tmp_path))
        assert info == DatasetInfo("imagenet256", (256, 256, 3), 1000, 3)
        it = make_train_iterator("imagenet256", batch_size=2, seed=0, data_dir=str(tmp_path),
                                 flip=True)
        for b in take(it, 2):
            assert b["image"].shape == (2, 256, 256, 3) and b["image"].dtype == np.float32
            assert -1 <= b["image"].min() and b["image"].max() <= 1 and b["image"].std() > 0.1
            assert b["label"].dtype == np.int32 and np.all((0 <= b["label"]) & (b["label"] < 1000))
        small = make_train_iterator("imagenet256", batch_size=2, seed=0, data_dir=str(tmp_path),
                                    image_size=64)
        assert small.info.image_shape == (64, 64, 3)
        assert next(small)["image"].shape == (2, 64, 64, 3)


def _adm_reference(image: np.ndarray, size: int) -> np.ndarray:
    """`center_crop_arr` of openai/guided-diffusion, verbatim apart from names."""
    from PIL import Image

    pil = Image.fromarray(image)
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@pytest.mark.parametrize("hw,size", [((131, 101), 32), ((300, 257), 64), ((41, 77), 32),
                                     ((96, 200), 48)])
def test_adm_center_crop_matches_guided_diffusion(hw, size):
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours = adm_center_crop(tf.constant(image), size).numpy().astype(int)
    ref = _adm_reference(image, size).astype(int)
    assert ours.shape == ref.shape == (size, size, 3)
    assert np.abs(ours - ref).max() <= 1 and np.mean(ours != ref) < 1e-3


def test_generic_tfds_dataset_via_mock_data(tmp_path):
    write_mock_metadata("mnist", tmp_path, num_examples=10)
    with tfds.testing.mock_data(
        num_examples=10, data_dir=str(tmp_path), policy=tfds.testing.MockPolicy.USE_FILES
    ):
        it = make_train_iterator("mnist", batch_size=4, seed=0, data_dir=str(tmp_path), flip=True)
        assert it.info == DatasetInfo("mnist", (28, 28, 1), 10, 10)
        b = next(it)
        assert b["image"].shape == (4, 28, 28, 1) and b["image"].dtype == np.float32
        assert -1 <= b["image"].min() and b["image"].max() <= 1
        assert np.all((0 <= b["label"]) & (b["label"] < 10))
        small = make_train_iterator("mnist", batch_size=4, seed=0, data_dir=str(tmp_path),
                                    image_size=14)
        assert next(small)["image"].shape == (4, 14, 14, 1)


# --- errors and environment ----------------------------------------------------------------


def test_missing_dataset_error_names_dataset_dir_and_command(tmp_path, monkeypatch):
    empty = str(tmp_path / "nothing here")
    with pytest.raises(DatasetNotReadyError) as err:
        make_train_iterator("mnist", batch_size=4, seed=0, data_dir=empty)
    msg = str(err.value)
    assert "'mnist'" in msg and empty in msg
    assert f"python -m shortcut.data.prepare mnist --data_dir {shlex.quote(empty)}" in msg
    assert f"tfds build mnist --data_dir {shlex.quote(empty)}" in msg

    monkeypatch.setenv("TFDS_DATA_DIR", empty)  # the default data_dir
    with pytest.raises(DatasetNotReadyError) as err:
        check_dataset("imagenet256")
    msg = str(err.value)
    manual = os.path.join(empty, "downloads", "manual")
    assert "'imagenet256'" in msg and "ILSVRC2012_img_train.tar" in msg and manual in msg
    assert f"python -m shortcut.data.prepare imagenet256 --data_dir {shlex.quote(empty)}" in msg


def test_unknown_dataset_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no_such_dataset"):
        check_dataset("no_such_dataset", data_dir=str(tmp_path))


def test_tensorflow_sees_no_accelerator():
    assert tf.config.get_visible_devices("GPU") == []


def test_package_imports_without_tensorflow():
    code = (
        "import sys; from shortcut.data import DatasetInfo, DatasetNotReadyError; "
        "assert 'tensorflow' not in sys.modules, 'imported TF'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_row_of_the_sources_table_resolves(tmp_path):
    """Each dataset of shortcut/data/sources.py: its builder is a TFDS builder of that name (ours, or TFDS's
    registry), every function a cell names exists, and the name passes spec validation."""
    from shortcut.data.catalog import get_builder, not_ready_message
    from shortcut.data.sources import SOURCES, load, unknown_dataset

    for name, source in SOURCES.items():
        assert unknown_dataset(name) is None
        if source.builder:
            builder = get_builder(source, str(tmp_path))
            assert builder.name == source.tfds_name and type(builder).__module__.startswith("shortcut.data.")
        else:  # imagenet256: TFDS's imagenet2012 under our name
            assert source.tfds_name in tfds.list_builders(with_community_datasets=False)
        assert all(callable(load(ref)) for ref in (source.check_files, source.not_ready) if ref)
        if not source.on_first_use:
            assert f"prepare {name}" in not_ready_message(source, str(tmp_path))
