"""Loads an ml_collections config file and applies `--config.a.b=value` overrides, with one-line errors.

The semantics follow ml_collections' config_flags (a Python file with `get_config()`, dotted overrides typed by the
field they replace); the parsing is our own so that every mistake is a UserError naming the key, never a traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections

from dmc_jax.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports `path` and returns its get_config(); `file.py:ARG` calls get_config('ARG') (ml_collections style)."""
    arg = None
    if ":" in path and not os.path.isfile(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found; pass --config configs/<name>.py")
    spec = importlib.util.spec_from_file_location(f"_dmc_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is user input: report it in one line
        raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} defines no get_config(); add one returning an ml_collections.ConfigDict")
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"get_config() in {path} does not take {'an argument' if arg else 'no argument'} "
                        f"({e}); check the ':ARG' suffix of --config") from None
    except Exception as e:  # e.g. an unknown variant: the config file's own check, reported in one line
        call = "get_config()" if arg is None else f"get_config({arg!r})"
        detail = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{call} in {path} failed: {type(e).__name__}: {detail}"
                        + ("; check the ':ARG' suffix of --config" if arg is not None else "")) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config() in {path} must return an ml_collections.ConfigDict, got {type(config).__name__}")
    return config


def _parse_value(key: str, text: str, current):
    """Converts the override text to the type of the field it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise UserError(f"--config.{key} expects true or false, got {text!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"--config.{key} expects a {type(current).__name__}, got {text!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"--config.{key} expects a {type(current).__name__}, got {text!r}")
        if isinstance(current, int) and not float(value).is_integer():
            raise UserError(f"--config.{key} expects an integer, got {text!r}")
        return type(current)(value)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)) or current is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if current is None:
                return text
            raise UserError(f"--config.{key} expects a Python literal like (1, 2), got {text!r}") from None
        if isinstance(current, tuple) and isinstance(value, (list, int, float, str)):
            value = tuple(value) if isinstance(value, list) else (value,)
        if isinstance(current, (tuple, list)):
            _check_elements(key, value, current, text)
        return value
    raise UserError(f"--config.{key} cannot be set from the command line (a {type(current).__name__})")


def _element_kind(x) -> str:
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return {str: "str", tuple: "tuple", list: "tuple"}.get(type(x), type(x).__name__)


def _check_elements(key: str, value, current, text: str) -> None:
    """A tuple-valued field keeps its kind of elements: (1, 8) takes numbers (the section's validation says if
    they must be whole), ('a', 'b') strings, (('a', 'b'),) tuples."""
    if not isinstance(value, (tuple, list)):
        raise UserError(f"--config.{key} expects a tuple like {tuple(current)!r}, got {text!r}")
    kinds = {_element_kind(x) for x in current}
    if not kinds:  # an empty default says nothing; the section's own validation checks the entries
        return
    want = kinds.pop() if len(kinds) == 1 else None
    if want is None:
        return
    for x in value:
        if _element_kind(x) != want:
            example = ", ".join(repr(c) for c in tuple(current)[:3])
            noun = {"str": "strings", "number": "numbers"}.get(want, want + "s")
            raise UserError(f"--config.{key} expects a tuple of {noun} like "
                            f"({example}{',' if len(current) == 1 else ''}), got {x!r} in {text!r}")


def _set(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    node = config
    parts = key.split(".")
    for depth, name in enumerate(parts):
        fields = list(node.keys())
        if name not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean {'.'.join(parts[:depth] + close)}?" if close else ""
            raise UserError(f"unknown config key {key!r}{hint} (keys at {where}: {', '.join(sorted(fields))})")
        if depth < len(parts) - 1:
            node = node[name]
            if not isinstance(node, ml_collections.ConfigDict):
                raise UserError(f"config key {'.'.join(parts[:depth + 1])} is a value, not a section")
    leaf = parts[-1]
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise UserError(f"config key {key} is a section; set one of its fields: {', '.join(sorted(node[leaf]))}")
    node[leaf] = _parse_value(key, text, node[leaf])


def parse_argv(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """`--config FILE [--config.a.b=v | --config.a.b v]...` -> the overridden ConfigDict."""
    path, overrides, args = None, [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-config"):
            if i + 1 >= len(args):
                raise UserError("--config needs a file: --config configs/<name>.py")
            path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
            continue
        if arg.startswith("--config."):
            if "=" in arg:
                key, value = arg[len("--config."):].split("=", 1)
                i += 1
            elif i + 1 < len(args):
                key, value, i = arg[len("--config."):], args[i + 1], i + 2
            else:
                raise UserError(f"{arg} needs a value: {arg}=VALUE")
            overrides.append((key, value))
            continue
        raise UserError(f"unexpected argument {arg!r}; usage: python -m dmc_jax.main --config FILE --config.key=value")
    if path is None:
        raise UserError("no config given; usage: python -m dmc_jax.main --config configs/smollm2.py [--config.key=value]")
    config = load_config_file(path)
    with config.unlocked():
        for key, value in overrides:
            _set(config, key, value)
    config.lock()
    return config
