"""Our Flax FID Inception against pytorch-fid's, with identical random weights.

The reference is pytorch-fid's own FID Inception (torchvision's Inception3 patched with
FIDInceptionA/C/E_1/E_2), built through pytorch-fid's code path: its weight loader is
pointed at a .pth that we write from our randomly initialised variables, and our side
reads that same .pth with the torch-free loader. Needs torch, torchvision and pytorch-fid
(``pip install torch pytorch-fid --no-deps torchvision``); skipped otherwise.

The PyPI torchvision wheels are built against CUDA torch; with a CPU torch their
compiled ops fail to load and ``import torchvision`` raises. Only torchvision's
pure-Python model code is needed, so in that case it is imported without running
torchvision/__init__.py (see ``_import_pytorch_fid``).
"""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

from shortcut.evaluation.fid import InceptionFeatureNet
from shortcut.evaluation.inception import fid_preprocess, random_inception_variables
from shortcut.evaluation.inception_weights import variables_to_torch_state_dict

torch = pytest.importorskip("torch", reason="torch is not installed (dev extra: torch, pytorch-fid, torchvision)")


def _import_pytorch_fid():
    if importlib.util.find_spec("pytorch_fid") is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip("pytorch-fid or torchvision is not installed (pip install pytorch-fid torchvision --no-deps)")
    try:
        import torchvision  # noqa: F401
    except Exception:  # CUDA-built torchvision ops under CPU torch: load the model code only
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchvision")
        stub = types.ModuleType("torchvision")
        stub.__path__, stub.__spec__ = list(spec.submodule_search_locations), spec  # a later find_spec needs __spec__
        sys.modules["torchvision"] = stub
        stub.__version__ = importlib.import_module("torchvision.version").__version__
        importlib.import_module("torchvision.models.inception")
    return importlib.import_module("pytorch_fid.inception")


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    err = np.abs(ours - ref)
    big = np.abs(ref) > 1e-2 * scale
    return float(err.max() / scale), float((err[big] / np.abs(ref[big])).max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pfi = _import_pytorch_fid()
    variables = random_inception_variables(seed=1)
    sd = {k: torch.from_numpy(v) for k, v in variables_to_torch_state_dict(variables).items()}
    for k in [k for k in sd if k.endswith("bn.running_var")]:
        sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1008)
    assert len(sd) == 566  # the same tensors as pt_inception-2015-12-05-6726825d.pth
    path = tmp_path_factory.mktemp("w") / "random_fid_inception.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # the legacy format

    orig = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True)
    try:
        ref = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        pfi.load_state_dict_from_url = orig
    ours = InceptionFeatureNet.load(path, expected_sha256=None)
    return ours, ref


def _reference_features(ref, images_m1p1):
    x = torch.from_numpy(np.ascontiguousarray(np.transpose((images_m1p1 + 1) / 2, (0, 3, 1, 2)))).float()
    with torch.no_grad():
        return ref(x)[0][:, :, 0, 0].numpy()


@pytest.mark.parametrize("size", [299, pytest.param(64, marks=pytest.mark.slow)])
def test_pool3_features_match_pytorch_fid(models, size):
    # 299: the network alone (pytorch-fid's resize is then the identity); 64: with the resize.
    ours, ref = models
    images = np.random.default_rng(size).uniform(-1, 1, size=(2, size, size, 3)).astype(np.float32)
    a, b = ours.features(images), _reference_features(ref, images)
    assert a.shape == b.shape == (2, 2048)
    rel_max, rel_elem = _rel_err(a, b)
    print(f"\n[inception reference] input {size}px: max|diff|/max|ref| = {rel_max:.2e}, "
          f"max elementwise rel (|ref| > 1% of max) = {rel_elem:.2e}, max|ref| = {np.abs(b).max():.3g}")
    assert rel_max < 1e-4
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("size", [32, 64, 256, 512])
def test_resize_matches_torch_bilinear(size):
    # fid_preprocess vs torch F.interpolate(bilinear, align_corners=False, antialias=False),
    # the resize pytorch-fid applies. Identical for up- and downsampling.
    images = np.random.default_rng(size).uniform(-1, 1, size=(2, size, size, 3)).astype(np.float32)
    ours = np.asarray(fid_preprocess(images))
    t = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
                                        mode="bilinear", align_corners=False)
    theirs = t.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    assert np.max(np.abs(ours - theirs)) < 1e-5
