"""Locate, verify and convert the standard FID Inception weights (no download, no torch).

Accepted files (the same 2015-12-05 TF Inception graph, as distributed by two projects):

* ``pt_inception-2015-12-05-6726825d.pth``: pytorch-fid's state dict (566 tensors);
* ``inception_v3_weights_fid.pickle``: jax-fid's nested dict of numpy arrays, the file the
  official shortcut-models code (utils/fid.py) loads;
* ``fid_inception_v3.npz``: this project's converted form
  (``python -m shortcut.evaluation.convert_inception SRC``), which records the sha256 of
  the file it was converted from.

Lookup order: an explicit path; ``$SHORTCUT_INCEPTION_WEIGHTS`` (a file); then the
file names above, in that order, in ``$SHORTCUT_WEIGHTS_DIR`` or, if unset,
``~/.cache/shortcut-models/`` (:func:`default_weights_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import traverse_util

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
KNOWN_WEIGHTS = (PYTORCH_FID_WEIGHTS, JAX_FID_WEIGHTS)
KNOWN_SHA256 = {w.sha256: w for w in KNOWN_WEIGHTS}
CONVERTED_FILENAME = "fid_inception_v3.npz"
ENV_FILE = "SHORTCUT_INCEPTION_WEIGHTS"
ENV_DIR = "SHORTCUT_WEIGHTS_DIR"
# Marker to request "the file must be one of the known standard files".
STANDARD = "standard"


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights file is missing, unreadable or not the expected one."""


def default_weights_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "shortcut-models"


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


def save_variables_npz(path: str | os.PathLike, variables: dict, provenance: dict) -> None:
    """Write variables as a flat .npz ('params/Mixed_5b/...') with a provenance JSON entry."""
    import jax

    arrays = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arrays["/".join(k.key for k in p)] = np.asarray(leaf, np.float32)
    atomic_savez(path, __provenance__=np.array(json.dumps(provenance, sort_keys=True)), **arrays)


def load_variables_npz(path: str | os.PathLike) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as f:
        provenance = json.loads(str(f["__provenance__"])) if "__provenance__" in f.files else {}
        flat = {tuple(k.split("/")): f[k] for k in f.files if k != "__provenance__"}
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
    source_sha256: str  # sha256 of the original (.pth / .pickle) file these weights came from
    fmt: str


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix == ".npz":
        return "npz"
    if head[:2] == b"PK":
        return "torch"  # zip-format torch checkpoint
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
    else:
        if expected_sha256 == STANDARD and file_sha not in KNOWN_SHA256:
            raise InceptionWeightsError(
                f"{p} has sha256 {file_sha}, which is not a known FID Inception weights file. "
                "Wrong, corrupt or truncated file.\n" + how_to_provide()
            )
        if fmt == "torch":
            from shortcut.evaluation.torch_pickle import load_torch_state_dict

            variables = variables_from_torch_state_dict(load_torch_state_dict(p), str(p))
        else:
            variables = variables_from_jax_fid(load_jax_fid_pickle(p), str(p))
        source_sha = file_sha
    if expected_sha256 == STANDARD and source_sha not in KNOWN_SHA256:
        raise InceptionWeightsError(
            f"{p} was converted from a file with sha256 {source_sha}, which is not a known FID Inception "
            "weights file.\n" + how_to_provide()
        )
    return LoadedWeights(variables, p, file_sha, source_sha, fmt)


def convert_to_npz(src: str | os.PathLike, dst: str | os.PathLike | None = None,
                   expected_sha256: str | None = STANDARD) -> Path:
    """Convert a .pth or jax-fid pickle to this project's .npz (default: the default weights dir)."""
    loaded = load_inception_weights(src, expected_sha256)
    if loaded.fmt == "npz":
        raise ValueError(f"{src} is already a converted .npz")
    dst = Path(dst) if dst is not None else default_weights_dir() / CONVERTED_FILENAME
    save_variables_npz(
        dst,
        loaded.variables,
        {
            "source_file": Path(src).name,
            "source_sha256": loaded.file_sha256,
            "source_format": loaded.fmt,
            "params_digest": params_digest(loaded.variables),
        },
    )
    return dst
