"""Reads a PyTorch zip checkpoint (`torch.save`, format of torch >= 1.6) without torch and without running pickled
code: tensors come back as read-only numpy views of a memory map of the file.

Layout (torch/serialization.py): a ZIP_STORED archive `<name>/data.pkl` (the pickled object; each tensor's
storage is a persistent id ('storage', <storage class>, <key>, <device>, <numel>)), `<name>/data/<key>` (the raw
little-endian bytes of that storage), `<name>/byteorder`, `<name>/version`. Tensors are pickled as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.

The file is mapped, not read: a storage is `np.frombuffer` over the map at its entry's data offset, so loading a
13.5 GB checkpoint costs address space, and pages are read (and can be dropped again) as tensors are copied out.
Strides and offsets are checked against the storage's size before a view is made.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from typing import Any, Dict

import jax.numpy as jnp  # its bfloat16 / float8 types are numpy dtypes (ml_dtypes, which jax brings)
import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.weights.safe_unpickle import Hooks, TorchDType, safe_load

# legacy typed storage classes (what torch.save pickles) -> numpy dtype
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
    "Float8_e4m3fnStorage": jnp.float8_e4m3fn, "Float8_e5m2Storage": jnp.float8_e5m2,
    "UntypedStorage": np.uint8,
}
_NP_DTYPES = {"bfloat16": jnp.bfloat16, "float8_e4m3fn": jnp.float8_e4m3fn,
              "float8_e5m2": jnp.float8_e5m2}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # ZIP local file header (30 bytes)


class StorageType:
    """A pickled storage class: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _np_dtype(d) -> np.dtype:
    if isinstance(d, StorageType):
        return d.dtype
    if isinstance(d, TorchDType):
        return np.dtype(_NP_DTYPES.get(str(d), str(d)))
    raise UserError(f"tensor dtype {d!r} is not a torch dtype")


class TorchZip:
    """An open checkpoint: `load()` returns the unpickled object with tensors as numpy views of the map."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path} does not exist or is not a file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":
            hint = " (the pre-1.6 torch format: re-save it with torch.save)" if magic[:1] == b"\x80" else ""
            raise UserError(f"{path} is not a PyTorch zip checkpoint{hint}")
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{path} is not a readable zip archive ({e}); it may be truncated, re-download it") from None
        pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise UserError(f"{path} has {len(pkls)} <name>/data.pkl entries, a torch checkpoint has one")
        self.prefix = pkls[0][: -len("data.pkl")]
        byteorder = self._read(self.prefix + "byteorder", optional=True)
        if byteorder not in (None, b"little"):
            raise UserError(f"{path} was saved on a {byteorder.decode(errors='replace')}-endian machine; "
                            f"dmc_jax reads little-endian checkpoints only")
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._storages: Dict[str, np.ndarray] = {}

    def _read(self, name: str, optional: bool = False):
        try:
            return self._zip.read(name)
        except KeyError:
            if optional:
                return None
            raise UserError(f"{self.path} lacks {name}; the checkpoint is incomplete") from None

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where an entry's bytes start: after its local header, whose extra field may differ from the index's."""
        header = self._map[info.header_offset: info.header_offset + _LOCAL_HEADER.size]
        fields = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else None
        if fields is None or fields[0] != b"PK\x03\x04":
            raise UserError(f"{self.path}: entry {info.filename} has a corrupt header; re-download the file")
        return info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]

    def _storage(self, pid) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UserError(f"{self.path} has a persistent id {str(pid)[:80]!r} that is not a tensor storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, StorageType):
            raise UserError(f"{self.path}: storage {key} has type {kind!r}, not a torch storage class")
        if key in self._storages:
            return self._storages[key]
        name = f"{self.prefix}data/{key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise UserError(f"{self.path} lacks storage {name}; the checkpoint is incomplete") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"{self.path}: storage {name} is compressed; torch.save stores tensors uncompressed")
        itemsize = kind.dtype.itemsize
        count = info.file_size // itemsize
        if kind.name != "UntypedStorage" and count != int(numel):
            raise UserError(f"{self.path}: storage {name} holds {count} elements, its header says {numel}")
        offset = self._data_offset(info)
        if offset + info.file_size > len(self._map):
            raise UserError(f"{self.path} is truncated (storage {name} runs past the end); re-download it")
        self._storages[key] = np.frombuffer(self._map, kind.dtype, count=count, offset=offset)
        return self._storages[key]

    def _rebuild(self, storage, offset, size, stride, dtype=None) -> np.ndarray:
        """The tensor view: `size` elements with `stride` (in elements) from `offset`, bounds checked."""
        if dtype is not None and np.dtype(dtype) != storage.dtype:
            storage = storage.view(np.uint8)[: storage.nbytes - storage.nbytes % np.dtype(dtype).itemsize]
            storage = storage.view(dtype)
            # an untyped storage's offset is in bytes of the element type already (torch stores element offsets)
        size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
        if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
            raise UserError(f"{self.path} has a tensor with a malformed size/stride/offset")
        if 0 not in size:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.size:
                raise UserError(f"{self.path} has a tensor reaching element {last} of a {storage.size}-element "
                                f"storage; the checkpoint is corrupt")
        base = storage[offset:] if storage.size else storage
        item = storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(base, size, tuple(s * item for s in stride), writeable=False)

    def _hooks(self) -> Hooks:
        def rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
            return self._rebuild(storage, offset, size, stride)

        def rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
            return self._rebuild(storage, offset, size, stride, _np_dtype(dtype))

        def rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
            return data

        def rebuild_from_type_v2(func, new_type, args, state):
            if func not in (rebuild_v2, rebuild_v3, rebuild_parameter):
                raise UserError(f"{self.path} rebuilds a tensor subclass with {func!r}; refusing to load it")
            return func(*args)

        tensor_types = {}
        for cls in ("torch.Tensor", "torch.nn.parameter.Parameter"):
            tensor_types[cls] = type(cls.rsplit(".", 1)[1], (), {})
        globals_ = {"torch._utils._rebuild_tensor_v2": rebuild_v2, "torch._utils._rebuild_tensor_v3": rebuild_v3,
                    "torch._utils._rebuild_parameter": rebuild_parameter,
                    "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
                    "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2, **tensor_types}
        globals_.update({f"torch.{name}": StorageType(name) for name in STORAGE_DTYPES if name != "UntypedStorage"})
        globals_["torch.storage.UntypedStorage"] = StorageType("UntypedStorage")
        return Hooks(globals_, self._storage)

    def load(self) -> Any:
        """The checkpoint's object (dicts, lists, Namespace, numpy tensor views); UserError if it is unsafe."""
        return safe_load(self._read(self.prefix + "data.pkl"), self._hooks(), self.path)


def load(path: str) -> Any:
    """torch.load(path, map_location='cpu') without torch: tensors as read-only, memory-mapped numpy arrays."""
    return TorchZip(path).load()
