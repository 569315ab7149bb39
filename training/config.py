"""Recipe configs: a dataclass per recipe (the schema), filled from a YAML file plus ``key=value``
overrides (dotted for sections: ``optim.lr=3e-4``; values parsed as YAML scalars). An unknown key
or a wrongly typed value is an error naming the key, where it came from, and the closest valid key
or a renamed key's new name. ``--help`` lists every key with its default and its field's comment.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import logging
import math
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from encoder.errors import UserError
from encoder.files import atomic_write_text

T = TypeVar("T")

# Keys of the recipes before they shared one vocabulary: an old name says what it is now.
RENAMED = {
    "max_steps": "steps", "stop_at_step": "stop_after", "keep_checkpoints": "keep", "num_threads": "threads",
    "mixed_precision": "precision", "init": "encoder", "epochs": "steps", "model": "encoder / encoder_config",
    "lr": "optim.lr", "min_lr": "optim.min_lr_ratio", "weight_decay": "optim.weight_decay",
    "warmup_epochs": "optim.warmup_steps", "warmup_steps": "optim.warmup_steps", "grad_clip": "optim.grad_clip",
    "encoder_lr": "optim.encoder_lr", "optim.min_lr": "optim.min_lr_ratio",
    "data.list_file": "data.source", "data.train_list": "data.source", "data.val_list": "data.val_source",
    "data.video_root": "data.root", "data.image_size": "data.size", "data.clip_frames": "data.num_frames",
}


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a.b": 1, "c": "x"}``."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _section_type(tp: Any) -> Any:
    """The dataclass inside a field's type (``X``, ``X | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def _check_keys(cls: type, data: dict[str, Any], prefix: str, origin: str) -> None:
    """Every key of `data` names a field of `cls` (recursing into sections); else a UserError that
    names the key, where it came from, and the closest valid key or its new name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key in hints:
            section = _section_type(hints[key])
            if section is not None and isinstance(value, dict):
                _check_keys(section, value, f"{prefix}{key}.", origin)
            continue
        full = prefix + key
        if full in RENAMED or (not prefix and key in RENAMED):
            hint = f"; it was renamed to '{RENAMED.get(full) or RENAMED[key]}'"
        else:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise UserError(f"unknown key '{full}' {origin}{hint} valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                        f"{', '.join(names)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a section (mapping), got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp in _SCALARS:
        accepted, expected = _SCALARS[tp]
        if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, accepted) and (tp is bool or not isinstance(value, bool)):
            return tp(value)
        raise UserError(f"{where}: expected {expected}, got {value!r}")
    return value


# A scalar field's type: (the value types it takes, what an error says it expected)
_SCALARS = {bool: ((bool,), "true/false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
            str: ((str, int, float), "a string")}


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)  # keys were checked by `_check_keys`
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise UserError(f"{where or cls.__name__}: {err}") from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Build the dataclass `cls` from YAML file `path` (may be None) and ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file '{path}' is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file '{path}' must hold a mapping of keys to values")
        _check_keys(cls, data, "", f"in '{path}'")
    update = _nest(parse_overrides(overrides or []))
    _check_keys(cls, update, "", "on the command line")
    cfg = _from_dict(cls, _merge(data, update), "")
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()
    return cfg


def one_of(*allowed):
    """A `check` rule: the value is one of `allowed`."""
    return lambda v: None if v in allowed else "one of " + ", ".join(map(repr, allowed))


def in_range(low=-math.inf, high=math.inf, *, low_open=False, high_open=False, null=False):
    """A `check` rule: a finite number from `low` to `high` (None too with `null`)."""
    text = (f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}" if high < math.inf
            else f">= {low}" if low > -math.inf else "a finite number") + (" or null" if null else "")

    def rule(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
        return None if ok or (null and v is None) else text
    return rule


def check(cfg: Any, rules: dict[str, Any]) -> None:
    """A UserError naming the first dotted key of `rules` whose value breaks its rule."""
    for key, rule in rules.items():
        value = operator.attrgetter(key)(cfg)
        if need := rule(value):
            raise UserError(f"{key} must be {need}; got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), to_yaml(cfg))


def _field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of `cls` (and its bases) in its source: the one after the field on
    its line, else the block of comment lines right above it."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsourcelines(klass)[0]
        except (OSError, TypeError):
            continue
        block: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                block.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
            if m and m.group(1) in klass.__dataclass_fields__:
                text = (m.group(2) or " ".join(block)).strip()
                if text:  # a subclass that only changes a default keeps its base's comment
                    comments[m.group(1)] = text
            block = []
    return comments


def _key_lines(obj: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, comment) of every leaf field of the dataclass instance `obj`."""
    rows = []
    comments = _field_comments(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += _key_lines(value, f"{prefix}{f.name}.")
        else:
            shown = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                                   default_flow_style=True, width=10_000).strip()
            shown = shown.removesuffix("\n...").removesuffix("...").strip()
            rows.append((prefix + f.name, shown, comments.get(f.name, "")))
    return rows


def keys_help(cls: type) -> str:
    """The ``--help`` listing of a config class: ``key=default  comment`` per line."""
    rows = _key_lines(cls())
    width = min(44, max(len(f"{k}={d}") for k, d, _ in rows))
    lines = ["keys (key=default):"]
    for key, default, comment in rows:
        text = f"{key}={default}"
        lines.append(f"  {text:<{width}}  {comment}".rstrip() if len(text) <= width
                     else f"  {text}\n  {'':<{width}}  {comment}".rstrip())
    return "\n".join(lines)


def config_from_argv(cls: type[T], prog: str, doc: str, argv: list[str] | None, example: str) -> T:
    """A recipe's command line (``--config FILE`` + ``key=value`` overrides) → `cls`; INFO logging."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=keys_help(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under training/configs/ (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    # The deepspeed launcher passes --local_rank=N to every process (LOCAL_RANK says the same).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    return load_config(cls, args.config, args.overrides)
