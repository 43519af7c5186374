"""Read PyTorch ``.pth`` state dicts and TorchScript archives into numpy arrays without importing torch.

Supports both serialisation formats torch.save has written: the zip archive
(torch >= 1.6: ``<name>/data.pkl`` + ``<name>/data/<key>``) and the legacy
stream (magic number, protocol, sys info, pickle, storage keys, raw storages),
and the tensors of a ``torch.jit.save``-d module (the same zip layout; its data.pkl
pickles the module tree as ``__torch__.*`` objects, read here as inert attribute dicts).
The unpickler only resolves the handful of globals a state dict of tensors needs,
so a file cannot run code while being read.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported tensor storage type torch.{name}")
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not size:
        return np.array(storage[storage_offset], copy=True)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


# torch.jit._pickle's helpers for typed attributes (e.g. a List[int] padding): plain values here.
_JIT_LIST_BUILDERS = {
    "build_intlist": list, "build_doublelist": list, "build_boollist": list, "build_tensorlist": list,
    "restore_type_tag": lambda value, type_str: value,
}


class _ScriptObject:
    """A TorchScript module or object from data.pkl: only its pickled attributes, no code."""

    def __init__(self, *unused):
        self.attributes: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected TorchScript object state {type(state).__name__}")
        self.attributes = state


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage, defer_tensors: bool = False, script_objects: bool = False):
        super().__init__(file)
        self._load_storage = load_storage
        self._defer = defer_tensors
        self._script = script_objects

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return (lambda *args: _DeferredTensor(args)) if self._defer else _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if self._script and module.startswith("__torch__."):
            return _ScriptObject
        if self._script and module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
            return _JIT_LIST_BUILDERS[name]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._load_storage(pid)


def _load_zip(path, script_objects: bool = False):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a torch zip checkpoint (no unique data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
        cache: dict[str, np.ndarray] = {}

        def load_storage(pid):
            _, stype, key, _location, numel = pid[:5]
            if key not in cache:
                raw = zf.read(f"{prefix}data/{key}")
                dtype = stype.dtype.newbyteorder("<" if byteorder == "little" else ">")
                arr = np.frombuffer(raw, dtype=dtype)
                cache[key] = arr.astype(stype.dtype.newbyteorder("="), copy=False)
            arr = cache[key]
            if arr.size != numel:
                raise ValueError(f"{path}: storage {key} has {arr.size} elements, expected {numel}")
            return arr

        with zf.open(pkl[0]) as f:
            return _TorchUnpickler(io.BytesIO(f.read()), load_storage, script_objects=script_objects).load()


def _load_legacy(path) -> dict:
    with open(path, "rb") as f:
        meta = pickle.Unpickler(f)
        magic = meta.load()
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (bad magic number)")
        protocol = meta.load()
        if protocol != 1001:
            raise ValueError(f"{path}: unsupported legacy torch protocol {protocol}")
        sys_info = meta.load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")

        storages: dict[str, tuple[_StorageType, int]] = {}

        def load_storage(pid):
            _, stype, root_key, _location, numel, view_meta = pid
            storages.setdefault(root_key, (stype, numel))
            if view_meta is not None:
                _view_key, offset, view_size = view_meta
                return _Lazy(root_key, offset, view_size)
            return _Lazy(root_key)

        # Tensors are built after the raw storages are read (they follow the pickle).
        result = _TorchUnpickler(f, load_storage, defer_tensors=True).load()
        keys = pickle.Unpickler(f).load()
        data: dict[str, np.ndarray] = {}
        for key in keys:
            stype, numel = storages[key]
            (n,) = struct.unpack("<q", f.read(8))
            nbytes = n * stype.dtype.itemsize
            if n != numel:
                raise ValueError(f"{path}: storage {key} has {n} elements, expected {numel}")
            buf = f.read(nbytes)
            if len(buf) != nbytes:
                raise ValueError(f"{path}: truncated file while reading storage {key}")
            data[key] = np.frombuffer(buf, dtype=stype.dtype.newbyteorder("<")).astype(stype.dtype)
    return _resolve(result, data)


class _Lazy:
    """A storage reference whose bytes come after the pickle in a legacy file."""

    def __init__(self, key, offset=0, size=None):
        self.key, self.offset, self.size = key, offset, size

    def get(self, data):
        arr = data[self.key]
        if self.size is not None:
            arr = arr[self.offset : self.offset + self.size]
        return arr


class _DeferredTensor:
    def __init__(self, args):
        self.args = args

    def build(self, data):
        storage, *rest = self.args
        return _rebuild_tensor(storage.get(data), *rest)


def _resolve(obj, data):
    if isinstance(obj, _DeferredTensor):
        return obj.build(data)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, data)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, data) for v in obj)
    return obj


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save``-d state dict (zip or legacy format) as {name: numpy array}."""
    if zipfile.is_zipfile(path):
        sd = _load_zip(path)
    else:
        sd = _load_legacy(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {str(k): np.asarray(v) for k, v in sd.items()}


def load_torchscript_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.jit.save``-d module as {dotted attribute path: numpy array}.

    Names follow the module tree as ``state_dict()`` does (``net.layers.conv.weight``); non-tensor
    attributes (strides, flags) are left out. The archive's code is never run.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a TorchScript archive (not a zip file)")
    root = _load_zip(path, script_objects=True)
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
    out: dict[str, np.ndarray] = {}

    def walk(obj: _ScriptObject, prefix: str) -> None:
        for key, value in obj.attributes.items():
            if isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, np.ndarray):
                out[prefix + key] = value

    walk(root, "")
    return out
