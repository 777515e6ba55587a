"""Reads the parameters and buffers of a TorchScript archive without running any of its code.

``torch.jit.load`` compiles and runs the archive's TorchScript (its ``__setstate__`` methods, for
one), and ``torch.load`` hands TorchScript archives to it, so for a file from elsewhere it is as
trusting as running a program. OpenAI's CLIP releases (``ViT-L-14-336px.pt``) are such archives.
This reader treats one as data only:

  * the archive is a zip: ``<name>/data.pkl`` (the module tree), ``<name>/data/<key>`` (raw tensor
    storages), ``<name>/code/**.py`` (the TorchScript source, read as *text*: each module class
    lists ``__parameters__`` and ``__buffers__`` there, which tells parameters from other
    attributes, as ``state_dict()`` does);
  * ``data.pkl`` goes through an unpickler that knows only tensor rebuilding, storage types,
    ``OrderedDict``, TorchScript's list builders and the archive's own ``__torch__`` classes (as
    inert attribute holders); any other global is refused, so nothing is imported or called.

The result is ``state_dict()``'s keys and values as NumPy arrays (floats as stored, bfloat16 as
float32); torch is not needed.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import PurePosixPath
from typing import Any

import numpy as np

# torch storage classes -> NumPy dtypes (bfloat16 via ml_dtypes, which JAX installs).
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# TorchScript's builders of typed lists and dicts: they only wrap their argument.
_LIST_BUILDERS = {"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist"}

_CLASS = re.compile(r"^class (\w+)\((\w+)\):\s*$")
_MEMBERS = re.compile(r"^  (__parameters__|__buffers__) = \[(.*)\]\s*$")


def is_torchscript(path: str | os.PathLike) -> bool:
    """A zip whose top folder holds ``constants.pkl``: how ``torch.load`` recognises one."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(PurePosixPath(n).name == "constants.pkl" for n in archive.namelist())


def read_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{state_dict key: array}`` of a TorchScript archive.

    Raises:
      ValueError: not a TorchScript archive, or one this reader cannot take apart without running
        code (an unknown global, a module class without its parameter list), naming the file.
    """
    with zipfile.ZipFile(path) as archive:
        prefix = _prefix(archive, path)
        members = _module_members(archive, prefix)
        try:
            root = _Unpickler(archive, prefix).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
            raise ValueError(f"{path}: unreadable TorchScript data.pkl ({e})") from None
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{path}: data.pkl holds {type(root).__name__}, not a TorchScript module")
    state: dict[str, np.ndarray] = {}
    _collect(root, "", members, state, path)
    return state


def _prefix(archive: zipfile.ZipFile, path) -> str:
    tops = {n.split("/", 1)[0] for n in archive.namelist() if n.endswith("/data.pkl")}
    if len(tops) != 1:
        raise ValueError(f"{path}: expected one <name>/data.pkl in the TorchScript archive")
    return tops.pop() + "/"


def _module_members(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[list, list]]:
    """``{qualified class: (parameter names, buffer names)}`` from the archive's code (as text)."""
    members: dict[str, tuple[list, list]] = {}
    code = prefix + "code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        # code/__torch__/a/b.py defines the classes of module __torch__.a.b
        module = name[len(code) : -len(".py")].replace("/", ".")
        current = None
        for line in archive.read(name).decode("utf-8", "replace").splitlines():
            header = _CLASS.match(line)
            if header:
                is_module = header.group(2) == "Module"
                current = f"{module}.{header.group(1)}" if is_module else None
                if current:
                    members[current] = ([], [])
                continue
            found = _MEMBERS.match(line) if current else None
            if found:
                names = re.findall(r'"([^"]*)"', found.group(2))
                members[current][0 if found.group(1) == "__parameters__" else 1].extend(names)
    return members


def _collect(obj: _ScriptObject, prefix: str, members, state, path, above=frozenset()) -> None:
    """``state_dict()``'s walk: own parameters and buffers, then every submodule's (a shared
    submodule under each of its names, as ``state_dict`` lists it)."""
    if id(obj) in above:  # a crafted data.pkl can make a module its own descendant
        raise ValueError(f"{path}: module {prefix or 'root'} contains itself")
    above = above | {id(obj)}
    if obj.qualname not in members:
        raise ValueError(
            f"{path}: no parameter list for module class {obj.qualname} in the archive's code; "
            "use a .safetensors copy of these weights instead"
        )
    params, buffers = members[obj.qualname]
    for name in params + buffers:
        value = obj.state.get(name)
        if isinstance(value, np.ndarray):  # None: an Optional parameter such as a missing bias
            state[prefix + name] = value
    for name, value in obj.state.items():
        if isinstance(value, _ScriptObject) and value.qualname in members:
            _collect(value, f"{prefix}{name}.", members, state, path, above)


class _ScriptObject:
    """An instance of one of the archive's TorchScript classes: its attributes, nothing more."""

    qualname = ""
    state: dict[str, Any] = {}  # read only here; BUILD gives each instance its own

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {}


class _Storage:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.prefix = archive, prefix
        self.big_endian = _read_text(archive, prefix + "byteorder") == "big"
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self.classes:  # a fresh inert class per TorchScript class
                self.classes[key] = type(name, (_ScriptObject,), {"qualname": key})
            return self.classes[key]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _type: value
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which this code-free reader does not allow; use a "
            ".safetensors copy of these weights instead"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        # ('storage', storage type, key, location, element count): raw bytes in data/<key>.
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage, key = pid[1], str(pid[2])
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"unknown storage type {storage!r}")
        data = self.archive.read(f"{self.prefix}data/{key}")
        dtype = np.dtype(_numpy_dtype(storage.dtype))
        if self.big_endian:
            dtype = dtype.newbyteorder(">")
        return np.frombuffer(data, dtype)


def _rebuild_tensor(storage, offset, size, stride, *_requires_grad_hooks_metadata):
    """torch._utils._rebuild_tensor_v2 in NumPy: a strided view into the storage, copied."""
    offset = int(offset)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    # as_strided does no bounds checks: a crafted size or stride would read foreign memory.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if min(size, default=1) > 0 and (
        offset < 0 or min(stride, default=0) < 0 or last >= storage.size
    ):
        raise pickle.UnpicklingError(
            f"tensor of size {size}, stride {stride}, offset {offset} lies outside its storage "
            f"of {storage.size} elements"
        )
    if not size:  # a 0-d array, not a NumPy scalar
        array = storage[offset : offset + 1].reshape(()).copy()
    else:
        strides = tuple(s * storage.itemsize for s in stride)
        array = np.lib.stride_tricks.as_strided(storage[offset:], size, strides).copy()
    array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name


def _read_text(archive: zipfile.ZipFile, name: str) -> str | None:
    try:
        return archive.read(name).decode().strip()
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------
# ``torch.save`` archives: tensors, state dicts and whole pickled ``nn.Module`` objects, as data.
#
# ``torch.save(module)`` pickles the module's class by name (``clip.adaptor.Adaptor``), so
# ``torch.load`` must import the code that defined it (and, without ``weights_only``, may run
# anything the pickle names). ``read_saved`` reads the same zip archive (``<name>/data.pkl`` plus
# ``<name>/data/<key>`` storages, the layout ``torch.save`` writes since torch 1.6) with the
# unpickler above, extended by: ``torch._utils._rebuild_parameter`` (a Parameter is its array),
# ``set`` (a module's ``_non_persistent_buffers_set``), the classes of ``torch.nn.modules`` and the
# foreign classes the caller names, all as inert ``SavedModule`` holders of their attributes. No
# class is imported and nothing the file names is called except those rebuild functions.


class SavedModule:
    """A pickled ``nn.Module`` read as data: its class name (``qualname``) and attributes."""

    qualname = ""
    state: dict[str, Any] = {}  # read only here; BUILD gives each instance its own

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"

    def children(self) -> dict[str, SavedModule]:
        """``_modules`` (submodules by name; ``None`` entries left out, as ``state_dict`` does)."""
        modules = self.state.get("_modules") or {}
        return {k: v for k, v in modules.items() if isinstance(v, SavedModule)}

    def state_dict(self) -> dict[str, np.ndarray]:
        """``nn.Module.state_dict()``'s keys and arrays: own parameters, persistent buffers, then
        every submodule's under ``<name>.``."""
        out: dict[str, np.ndarray] = {}
        self._collect("", out, frozenset())
        return out

    def _collect(self, prefix: str, out: dict[str, np.ndarray], above: frozenset) -> None:
        if id(self) in above:  # a crafted pickle can make a module its own descendant
            raise ValueError(f"module {prefix or 'root'} contains itself")
        above = above | {id(self)}
        skip = self.state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, np.ndarray):
                    raise ValueError(f"{prefix}{name} is {type(value).__name__}, not a tensor")
                out[prefix + name] = value
        for name, child in self.children().items():
            child._collect(f"{prefix}{name}.", out, above)

    def modules(self, prefix: str = "") -> dict[str, SavedModule]:
        """``named_modules()``: ``{dotted path ('' = this one): module}``."""
        found = {prefix.rstrip("."): self}
        for name, child in self.children().items():
            found.update(child.modules(f"{prefix}{name}."))
        return found


def _rebuild_parameter(data, _requires_grad=None, _hooks=None, *_state):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor here."""
    if not isinstance(data, np.ndarray):
        raise pickle.UnpicklingError(f"a Parameter of {type(data).__name__}, not of a tensor")
    return data


class _SavedUnpickler(_Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, classes: dict[str, set[str]]):
        super().__init__(archive, prefix)
        self.allowed = classes

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in (
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        ):
            return _rebuild_parameter
        if module in ("builtins", "__builtin__") and name == "set":
            return set
        if module.startswith("torch.nn.modules.") or name in self.allowed.get(module, ()):
            key = f"{module}.{name}"
            if key not in self.classes:  # a fresh inert class per pickled class
                self.classes[key] = type(name, (SavedModule,), {"qualname": key})
            return self.classes[key]
        if not module.startswith("__torch__"):  # TorchScript classes: not in a torch.save file
            try:
                return super().find_class(module, name)
            except pickle.UnpicklingError:
                pass
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which this code-free reader does not allow (only "
            "tensors, containers, torch.nn modules and the expected module classes)"
        )


def is_saved_archive(path: str | os.PathLike) -> bool:
    """A zip with one ``<name>/data.pkl`` and no TorchScript ``constants.pkl``: a ``torch.save``
    file (torch >= 1.6 format)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/data.pkl") for n in names) and not any(
        PurePosixPath(n).name == "constants.pkl" for n in names
    )


def read_saved(path: str | os.PathLike, *, classes: dict[str, Any] | None = None) -> Any:
    """The object ``torch.save`` wrote to ``path``, as data: tensors and Parameters as NumPy arrays
    (bfloat16 as float32), containers as themselves, modules as ``SavedModule``.

    ``classes`` names the foreign module classes the pickle may use, ``{"clip.adaptor":
    {"Adaptor", ...}}``; any other global is refused (naming it) before anything is built.

    Raises:
      ValueError: not a ``torch.save`` zip archive (the legacy pre-1.6 format included), a damaged
        one, or one naming a global this reader does not allow; the message names the file.
    """
    allowed = {str(k): {str(n) for n in v} for k, v in (classes or {}).items()}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path}: not a torch.save zip archive ({e}); files in the legacy format of "
            "torch < 1.6 must be re-saved with a newer torch first"
        ) from None
    with archive:
        names = archive.namelist()
        if any(PurePosixPath(n).name == "constants.pkl" for n in names):
            raise ValueError(
                f"{path}: a TorchScript archive (torch.jit.save), not a torch.save file"
            )
        prefix = _prefix(archive, path)
        try:
            return _SavedUnpickler(archive, prefix, allowed).load()
        except (
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            KeyError,
            ValueError,
            TypeError,
            EOFError,
            AttributeError,
            IndexError,
        ) as e:
            raise ValueError(f"{path}: unreadable torch.save data.pkl ({e})") from None
