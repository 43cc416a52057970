"""Turn TOML files, checkpoint dicts and ``--set section.key=value`` overrides into a config dataclass.

The loader is generic. It knows only the shape of the configs: a top-level dataclass whose fields are
*section* dataclasses, whose fields are scalars: ``int``, ``float``, ``bool``, ``str``, ``X | None``,
or ``Literal[...]``. Sections validate themselves in ``__post_init__`` by raising ``ValueError``; this
module turns that, and every other problem with user input, into a one-line :class:`ConfigError`
that names the key and, where it can, suggests the fix.

None handling: :func:`config_to_dict` keeps ``None`` values (JSON ``null``), and :func:`build_config`
accepts ``None`` for ``X | None`` fields, so dicts round-trip exactly. TOML has no null, so
:func:`config_to_toml` leaves ``None`` fields out and reading the text back gives the field's default.
That round-trips because optional fields default to ``None``; if one does not, the writer emits a
comment saying how to set it to none (``--set section.key=none``) and the value is lost in the TOML.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config"  # the shipped configs, listed when a config file is not found

OVERRIDE_FORM = "--set section.key=value"
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(UserError):
    """A config file, checkpoint config or override is wrong; the message says which key and how to fix it."""


# ---------------------------------------------------------------------------------------------------
# messages


def format_choices(choices: Iterable[Any]) -> str:
    """``a, b, c``: how every message lists the valid names or values."""
    return ", ".join(str(c) for c in choices)


def _initials(name: str) -> str:
    return "".join(part[0] for part in re.split(r"[_\-.]+", name) if part)


def close_matches(name: str, choices: Iterable[Any]) -> list[str]:
    """The (at most 3) choices close to ``name``: similar spelling (difflib), or one is the
    underscore-initials of the other (``learning_rate`` ~ ``lr``); compared case-insensitively."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    wanted = name.lower()
    found = difflib.get_close_matches(wanted, list(by_lower), n=3, cutoff=0.6)
    if not found and len(wanted) > 1:
        found = [c for c in by_lower if len(c) > 1 and (c == _initials(wanted) or _initials(c) == wanted)][:3]
    return [by_lower[c] for c in found]


def did_you_mean(names: Iterable[str]) -> str:
    """`` (did you mean 'x' or 'y'?)``, or ``""`` for no names."""
    names = list(names)
    return " (did you mean " + " or ".join(map(repr, names)) + "?)" if names else ""


def suggest(name: str, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the choices close to ``name``, or ``""`` when none is."""
    return did_you_mean(close_matches(name, choices))


def _describe(value: Any) -> str:
    """``'abc' (str)``: a value that came from TOML or a dict, with its type."""
    return f"{value!r} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------------------
# the shape of a config class


def _check_dataclass(cls: Any, what: str) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{what} must be a dataclass type, got {cls!r}")


def toml_key(name: str) -> str:
    """A field's key in TOML and --set: its name, but for a Python keyword, which a field spells with a trailing
    underscore (`InitConfig.from_` is `init.from`)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    """``{TOML key: field}`` of a dataclass's fields."""
    return {toml_key(f.name): f for f in dataclasses.fields(cls) if f.init}


def _sections(cls: type) -> dict[str, type]:
    """``{section name: section dataclass}`` of a top-level config class."""
    _check_dataclass(cls, "the config class")
    hints = typing.get_type_hints(cls)
    sections = {}
    for name in _fields(cls):
        tp = hints[name]
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise TypeError(f"{cls.__name__}.{name} must be a section dataclass, got {tp!r}")
        sections[name] = tp
    return sections


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _sections_with_key(sections: Mapping[str, type], key: str) -> list[str]:
    return [f"{s}.{key}" for s, tp in sections.items() if key in _fields(tp)]


# ---------------------------------------------------------------------------------------------------
# values


_TYPE_WORDS = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None`` / ``Optional[X]``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported config field type {tp!r}: only X | None unions are supported")
    return None


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def coerce(value: Any, tp: Any, key: str, *, from_string: bool = False, _or_none: bool = False) -> Any:
    """Check ``value`` against the field type ``tp`` and convert it; ``key`` (``section.key``) names it in errors.

    ``from_string``: the value is the text of an override and is parsed according to ``tp``
    (``none``/``null`` means None for optional fields; quotes around a string are stripped).
    Otherwise it came from TOML or a dict: ints are accepted for floats, nothing else is converted.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (from_string and value.strip().lower() in _NONE_WORDS):
            return None
        return coerce(value, inner, key, from_string=from_string, _or_none=True)

    if from_string:
        text = value.strip()
        got = repr(text)
    else:
        got = _describe(value)

    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if from_string:
            text = _unquote(text)
            matches = [c for c in choices if str(c) == text]
        else:
            matches = [c for c in choices if type(c) is type(value) and c == value]
        if matches:
            return matches[0]
        raw = text if from_string else value
        listed = format_choices(choices) + (" or none" if _or_none else "")
        raise ConfigError(f"{key} must be one of {listed}; got {raw!r}{suggest(str(raw), choices)}")

    if tp not in _TYPE_WORDS:
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    expects = f"{key} expects {_TYPE_WORDS[tp]}{' or none' if _or_none else ''}, got {got}"

    if from_string:
        if tp is str:
            return _unquote(text)
        if tp is bool:
            if text.lower() in _TRUE_WORDS:
                return True
            if text.lower() in _FALSE_WORDS:
                return False
            raise ConfigError(expects)
        try:
            return tp(text)
        except ValueError:
            pass
        if tp is int:
            try:
                as_float = float(text)
            except ValueError:
                pass
            else:
                if as_float.is_integer():
                    raise ConfigError(f"{expects}; write {int(as_float)}") from None
        raise ConfigError(expects)

    if tp is float and type(value) in (int, float):  # not bool: bool is an int subclass
        return float(value)
    if type(value) is tp:
        return value
    if tp is int and type(value) is float and value.is_integer():
        raise ConfigError(f"{expects}; write {int(value)} (no decimal point)")
    if tp is str and not isinstance(value, (dict, list)):
        raise ConfigError(f"{expects}; put it in quotes")
    raise ConfigError(expects)


# ---------------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str, sections: Mapping[str, type] | None = None) -> tuple[str, str, str]:
    """``"optim.lr=1e-3"`` -> ``("optim", "lr", "1e-3")``. Whitespace around the key and value is dropped."""
    bad = f"bad override {text!r}: expected {OVERRIDE_FORM}"
    if "=" not in text:
        raise ConfigError(f"{bad} (no '=')")
    dotted, value = text.split("=", 1)
    dotted, value = dotted.strip(), value.strip()
    if not dotted:
        raise ConfigError(f"{bad} (empty key)")
    if "." not in dotted:
        hint = did_you_mean(f"{d}={value}" for d in _sections_with_key(sections, dotted)) if sections else ""
        raise ConfigError(f"{bad} (the key needs a section){hint}")
    section, key = (part.strip() for part in dotted.split(".", 1))
    if not section or not key:
        raise ConfigError(f"{bad} (empty section or key)")
    return section, key, value


# ---------------------------------------------------------------------------------------------------
# building


def _unknown_section(name: str, sections: Mapping[str, type]) -> ConfigError:
    return ConfigError(f"unknown section {name!r}{suggest(name, sections)}; sections are: {format_choices(sections)}")


def _unknown_key(section: str, key: str, sections: Mapping[str, type]) -> ConfigError:
    fields = _fields(sections[section])
    names = [f"{section}.{k}" for k in close_matches(key, fields)] or _sections_with_key(sections, key)
    msg = f"unknown key '{section}.{key}'{did_you_mean(names)}"
    if not names:
        msg += f"; keys in [{section}] are: {format_choices(fields)}"
    return ConfigError(msg)


def split_unknown(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(known, unknown)``: ``data`` ({section: {key: value}}) without the sections and keys ``cls`` does not have,
    and those as ``section.key`` (``name`` for a value outside any section). For a config written by another
    version (a checkpoint's), whose unknown keys are that version's settings, not typos: see :func:`build_config`."""
    sections = _sections(cls)
    known: dict[str, Any] = {}
    unknown: list[str] = []
    if not isinstance(data, Mapping):
        return data, unknown  # build_config says what is wrong with it
    for name, table in data.items():
        if not isinstance(table, Mapping):
            if name in sections:
                known[name] = table  # build_config says what is wrong with it
            else:
                unknown.append(str(name))
        elif name not in sections:
            unknown += [f"{name}.{key}" for key in table] or [str(name)]
        else:
            fields = _fields(sections[name])
            known[name] = {key: value for key, value in table.items() if key in fields}
            unknown += [f"{name}.{key}" for key in table if key not in fields]
    return known, unknown


def build_config(cls: type, data: Mapping[str, Any], overrides: Iterable[str] = ()) -> Any:
    """Build ``cls`` from ``{section: {key: value}}`` (parsed TOML or a saved ``config_to_dict``) plus overrides.

    Each override is ``"section.key=value"``, its value parsed per the field's type; later ones win,
    and they win over ``data``. Sections and keys not given keep their defaults. Any problem raises
    a one-line :class:`ConfigError`.
    """
    sections = _sections(cls)
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.key=value' strings, not one string")
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a table of [sections], got {_describe(data)}")

    # (section, key) -> (value, from_string), in the order given
    given: dict[str, dict[str, tuple[Any, bool]]] = {}
    for name, table in data.items():
        if name not in sections:
            if not isinstance(table, Mapping):  # a key = value outside any [section]
                hint = did_you_mean(_sections_with_key(sections, name))
                raise ConfigError(f"key {name!r} must be inside a [section]{hint}; sections are: {format_choices(sections)}")
            raise _unknown_section(name, sections)
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name!r} must be a [{name}] table of key = value pairs, got {_describe(table)}")
        for key, value in table.items():
            if key not in _fields(sections[name]):
                raise _unknown_key(name, key, sections)
            given.setdefault(name, {})[key] = (value, False)
    for text in overrides:
        section, key, value = parse_override(text, sections)
        if section not in sections:
            raise _unknown_section(section, sections)
        if key not in _fields(sections[section]):
            raise _unknown_key(section, key, sections)
        given.setdefault(section, {})[key] = (value, True)

    top_fields = _fields(cls)
    built = {}
    for name, section_cls in sections.items():
        hints, fields = typing.get_type_hints(section_cls), _fields(section_cls)
        values = {
            fields[key].name: coerce(value, hints[fields[key].name], f"{name}.{key}", from_string=from_string)
            for key, (value, from_string) in given.get(name, {}).items()
        }
        top = top_fields[name]
        try:
            if top.default is not dataclasses.MISSING:
                built[name] = dataclasses.replace(top.default, **values) if values else top.default
            elif top.default_factory is not dataclasses.MISSING:
                built[name] = dataclasses.replace(top.default_factory(), **values)
            elif name in given or all(_has_default(f) for f in _fields(section_cls).values()):
                missing = [k for k, f in _fields(section_cls).items() if not _has_default(f) and f.name not in values]
                if missing:
                    raise ConfigError(f"missing key '{name}.{missing[0]}' (it has no default); set it in [{name}]")
                built[name] = section_cls(**values)
            else:
                raise ConfigError(f"missing section [{name}] (it has no default)")
        except ValueError as e:
            raise ConfigError(f"invalid [{name}]: {e}") from None
    try:
        return cls(**built)
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None


# ---------------------------------------------------------------------------------------------------
# files


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _toml_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.glob("*.toml") if p.is_file() and p.name != "pyproject.toml")
    except OSError:
        return []


def _not_found(path: Path) -> ConfigError:
    msg = f"config file '{path}' not found"
    candidates: list[Path] = []
    nearby = _toml_files(path.parent) if path.parent.resolve() != CONFIG_DIR.resolve() else []
    if nearby:
        msg += f"; .toml files in {_display(path.parent)}/: {format_choices(p.name for p in nearby)}"
        candidates += nearby
    shipped = _toml_files(CONFIG_DIR)
    if shipped:
        msg += f"; the shipped configs are in {_display(CONFIG_DIR)}/: {format_choices(p.name for p in shipped)}"
        candidates += shipped
    by_stem: dict[str, Path] = {}
    for p in candidates:
        by_stem.setdefault(p.stem, p)
    hint = did_you_mean(_display(by_stem[s]) for s in close_matches(path.stem, by_stem))
    return ConfigError(msg.replace(" not found", " not found" + hint, 1))


_TOML_WHERE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def load_config(cls: type, path: str | os.PathLike, overrides: Iterable[str] = ()) -> Any:
    """Read the TOML file at ``path`` and :func:`build_config` ``cls`` from it and ``overrides``."""
    path = Path(path)
    if path.is_dir():
        inside = _toml_files(path)
        listing = f"; the .toml files in it are: {format_choices(p.name for p in inside)}" if inside else ""
        raise ConfigError(f"config path '{path}' is a directory, not a TOML file{listing}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise _not_found(path) from None
    except tomllib.TOMLDecodeError as e:
        text = str(e)
        where = _TOML_WHERE.search(text)
        if where:
            text = text[: where.start()]
            raise ConfigError(f"invalid TOML in '{path}' at line {where[1]}, column {where[2]}: {text}") from None
        raise ConfigError(f"invalid TOML in '{path}': {text}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); is it really a TOML file?") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}") from None
    data.pop("sweep", None)  # `minigpt sweep`'s own table (sweep.py reads and checks it): not a run's setting
    return build_config(cls, data, overrides)


# ---------------------------------------------------------------------------------------------------
# writing


def config_to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` of plain values; ``None`` is kept (JSON null) and read back as None."""
    _check_dataclass(type(cfg), "config_to_dict's argument")
    out = {}
    for name in _sections(type(cfg)):
        section = getattr(cfg, name)
        out[name] = {key: getattr(section, f.name) for key, f in _fields(type(section)).items()}
    return out


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back exactly; always has '.' or 'e', so it stays a float
    if isinstance(value, str):
        return _toml_str(value)
    raise TypeError(f"cannot write {key} = {value!r} ({type(value).__name__}) as TOML")


def config_to_toml(cfg: Any) -> str:
    """The config as TOML text that :func:`load_config` reads back to an equal config. ``None`` values are left out."""
    blocks = []
    for name, table in config_to_dict(cfg).items():
        section_fields = _fields(type(getattr(cfg, name)))
        lines = [f"[{_toml_key(name)}]"]
        for key, value in table.items():
            if value is None:
                if section_fields[key].default is not None:
                    lines.append(f"# {_toml_key(key)} is none; TOML has no null: use --set {name}.{key}=none")
                continue
            lines.append(f"{_toml_key(key)} = {_toml_value(value, f'{name}.{key}')}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
