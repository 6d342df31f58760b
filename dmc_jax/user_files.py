"""The one place where the user's files are read and output locations checked: every way they go wrong is a
one-line UserError naming the file (and the config field or saved field it came from), never a traceback.

Prompt files, a model directory's JSON files (config.json, tokenizer and method files) and chat templates are read
here; corpus and evaluation text go through data/text_files.py (gzip, document splitting) with the same checks.

    read_text(path, what)                 UTF-8 text (a prompt file, ...): missing, unreadable, binary, not UTF-8
    read_json(path, what)                 JSON: missing, unreadable, not UTF-8, not JSON
    saved_section(path, saved, defaults, validate)
                                          a config section saved with a model (a method file such as
                                          dmc_config.json): unknown fields, wrong value types and bad values are
                                          blamed on the file and its field, not on a config field the user never set
    probe_writable(path, what, field)     creates the directory and writes (and removes) a probe file, so an
                                          unwritable output is found at start, before any work
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, Optional

import ml_collections

from dmc_jax.errors import UserError


def _read_bytes(path: str, what: str) -> bytes:
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} not found; check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a directory; give a file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} {path!r} ({e.strerror}); fix its permissions") from None


def decode_text(raw: bytes, name: str, if_binary: str = "give a UTF-8 text file",
                if_not_utf8: str = "convert it to UTF-8") -> str:
    """raw as UTF-8 text (a leading BOM dropped, newlines normalized); `name` (e.g. "prompt file 'x'") and the
    remedies go into the one-line UserError for binary or non-UTF-8 bytes."""
    if b"\x00" in raw:
        raise UserError(f"{name} looks binary (it contains NUL bytes); {if_binary}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text (bad byte at offset {e.start}); {if_not_utf8}") from None
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of path (a leading BOM dropped, newlines normalized)."""
    return decode_text(_read_bytes(path, what), f"{what} {path!r}")


def read_json(path: str, what: str) -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path!r} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-create "
                        f"it") from None


def _type_name(value) -> str:
    return "true/false" if isinstance(value, bool) else type(value).__name__


def _fits(default, value) -> bool:
    """Does a saved value have the type of the field's default? (an int is a fine float; a bool is no number)"""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (int, str)):
        return isinstance(value, type(default))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return default is None or value is None or isinstance(value, type(default))


def saved_section(path: str, saved: Any, defaults: ml_collections.ConfigDict,
                  validate: Optional[Callable[[ml_collections.ConfigDict], None]] = None,
                  fix: str = "re-export the model") -> ml_collections.ConfigDict:
    """defaults updated with saved (a JSON object read from path), every field type- and range-checked; errors
    name path and the field in it."""
    if not isinstance(saved, dict):
        raise UserError(f"{path} must hold a JSON object of fields, got {_type_name(saved)}; {fix}")
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise UserError(f"{path} has fields this version does not know ({', '.join(unknown)}); upgrade dmc_jax or "
                        f"remove them")
    section = ml_collections.ConfigDict(defaults.to_dict())
    for name, value in saved.items():
        if not _fits(defaults[name], value):
            raise UserError(f"{path}: field {name!r} must be {_type_name(defaults[name])} like "
                            f"{defaults[name]!r}, got {value!r}; {fix}")
        default = defaults[name]
        section[name] = (float(value) if isinstance(default, float) else tuple(value) if isinstance(default, tuple)
                         else value)
    if validate is not None:
        try:
            validate(section)
        except UserError as e:  # the validator names the config field; the value came from the file
            raise UserError(f"{path} holds a bad value: {e} (saved with the model, not set by you); {fix}") from None
    return section


def probe_writable(path: str, what: str, field: Optional[str] = None) -> None:
    """Creates directory path if missing and checks that a file can be written in it (UserError naming it and the
    config field that chose it, `what` unless given)."""
    field = field or what
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} exists and is not a directory; set {field} to a directory")
    probe = os.path.join(path, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe\n")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} {path} ({e.strerror}); make it writable or set {field} to "
                        f"another path") from None
