"""A pickle reader that never executes pickled code: every global resolves through an allow-list of our own
constructors, or the load stops with a one-line UserError naming the class.

Python's pickle runs whatever callable a GLOBAL opcode names (`os.system`, `builtins.eval`, ...). Here
`find_class` never imports anything: it returns one of the harmless stand-ins below, and REDUCE / NEWOBJ / BUILD
can therefore only call them. Extension-registry opcodes (EXT1/2/4), which reach globals without naming them,
are refused too. PyTorch checkpoints need, besides plain containers: the tensor rebuild functions and storage
classes (handled by the caller through `Hooks`), torch dtypes, OrderedDict, and what Megatron pickles in its
checkpoint: `argparse.Namespace` (its arguments) and, in the RNG state and Transformer Engine's extra state,
numpy arrays and BytesIO buffers, which come back as inert `Opaque` records (their contents are never needed).
"""

from __future__ import annotations

import collections
import io
import pickle
import types
from typing import Any, Callable, Dict, Tuple

import numpy as np

from dmc_jax.errors import UserError

# torch dtype name (as pickled: GLOBAL torch <name>) -> numpy-style dtype name
TORCH_DTYPES = {"float64": "float64", "double": "float64", "float32": "float32", "float": "float32",
                "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64",
                "int32": "int32", "int": "int32", "int16": "int16", "short": "int16", "int8": "int8",
                "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool", "complex64": "complex64", "complex128": "complex128",
                "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}

# Classes that only carry data we never read (RNG states, Transformer Engine extra state, Megatron enums): they
# come back as Opaque records of their pickled arguments and state.
OPAQUE = {
    "_io.BytesIO", "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType", "megatron.core.transformer.enums.AttnType",
}


class TorchDType(str):
    """A torch dtype as pickled (e.g. in Megatron's args.params_dtype); its value is the numpy-style name."""


class Opaque:
    """An inert stand-in for an allowed data-only class: records its name, call arguments and pickled state."""

    qualname = "opaque"

    def __init__(self, *args):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.qualname} (not decoded)>"


def _opaque_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Opaque,), {"qualname": qualname})


def _build_set(items=()):
    return set(items)


def _build_frozenset(items=()):
    return frozenset(items)


def _build_bytearray(*args):
    if args and isinstance(args[0], str):  # protocol 2 pickles bytearray as (latin-1 text, 'latin-1')
        return bytearray(args[0].encode("latin-1"))
    return bytearray(*args[:1])


def _build_complex(real=0.0, imag=0.0):
    return complex(float(real), float(imag))


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as protocol 2 uses it for bytes objects: latin-1 text -> bytes, nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise UserError(f"_codecs.encode called with {type(text).__name__}/{encoding!r}; only latin-1 text is "
                        f"allowed in a checkpoint")
    return text.encode("latin-1")


def _build_size(dims=()):
    return tuple(int(d) for d in dims)


def _build_device(*args):
    return ":".join(str(a) for a in args)


class Namespace(types.SimpleNamespace):
    """Stand-in for argparse.Namespace (Megatron's saved arguments): attributes only."""


_PLAIN = {
    "collections.OrderedDict": collections.OrderedDict,
    "argparse.Namespace": Namespace,
    "builtins.set": _build_set, "builtins.frozenset": _build_frozenset,
    "builtins.bytearray": _build_bytearray, "builtins.complex": _build_complex,
    "__builtin__.set": _build_set, "__builtin__.frozenset": _build_frozenset,
    "_codecs.encode": _latin1_encode,
    "torch.Size": _build_size, "torch.device": _build_device,
}


class Hooks:
    """What the caller resolves: torch's tensor rebuild functions, storage classes and persistent ids."""

    def __init__(self, globals_: Dict[str, Callable], persistent_load: Callable[[Any], Any]):
        self.globals = globals_
        self.persistent_load = persistent_load


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be restricted
    """Restricted unpickler: allow-listed stand-ins only; UserError (one line) for anything else."""

    dispatch = dict(pickle._Unpickler.dispatch)
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        def _refuse(self, _op=_op):
            raise UserError(f"{self.source} uses the pickle extension registry (opcode {_op!r}), which can reach "
                            f"arbitrary code; refusing to load it")
        dispatch[_op[0]] = _refuse
    del _op, _refuse

    def __init__(self, file, hooks: Hooks, source: str):
        super().__init__(file)
        self.hooks = hooks
        self.source = source
        self._opaque: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if qualname in self.hooks.globals:
            return self.hooks.globals[qualname]
        if qualname in _PLAIN:
            return _PLAIN[qualname]
        if module == "torch" and name in TORCH_DTYPES:
            return TorchDType(TORCH_DTYPES[name])
        if qualname in OPAQUE:
            return self._opaque.setdefault(qualname, _opaque_class(qualname))
        raise UserError(f"{self.source} pickles {qualname}, which is not on the allow-list of a weights "
                        f"checkpoint; refusing to load it (nothing was executed)")

    def persistent_load(self, pid):
        return self.hooks.persistent_load(pid)

    def load_build(self):
        # BUILD sets attributes; on a class or function (our stand-ins) that would rewrite them: data only.
        target = self.stack[-2] if len(self.stack) > 1 else None
        if isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, str,
                               np.ndarray)):  # an ndarray's __setstate__ would swap a tensor's buffer
            raise UserError(f"{self.source} sets attributes on {getattr(target, '__name__', type(target).__name__)} "
                            f"in its pickle, which a weights checkpoint never does; refusing to load it")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def safe_load(data: bytes, hooks: Hooks, source: str) -> Any:
    """Unpickles `data` with SafeUnpickler; malformed pickles become a UserError too."""
    try:
        return SafeUnpickler(io.BytesIO(data), hooks, source).load()
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"{source} nests its pickle too deeply; it is corrupt or hostile") from None
    except Exception as e:  # UnpicklingError, EOFError, TypeError from a stand-in given bad arguments, ...
        raise UserError(f"{source} is not a readable checkpoint pickle ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); re-download it") from None


def qualnames_allowed() -> Tuple[str, ...]:
    """Every class name the unpickler accepts besides the caller's hooks (for docs and tests)."""
    return tuple(sorted(set(_PLAIN) | OPAQUE | {f"torch.{n}" for n in TORCH_DTYPES}))
