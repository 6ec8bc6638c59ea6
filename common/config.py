"""Typed dataclass configs from YAML or TOML, with `dotted.key=value` overrides.

A config file states only what differs from the dataclass defaults. Unknown keys and wrong types are errors
naming the dotted key and the closest valid key; they are never merged silently.

    cfg = load_config(TrainConfig, "configs/price_fusion/train.yaml", ["optim.lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import functools
import importlib.metadata
import platform
import re
import subprocess
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from common.errors import UserError

T = TypeVar("T")
META_KEY = "_meta"  # provenance block of a resolved config.yaml (version, commit, time, environment); not a config key


class ConfigError(UserError):
    """A config file or override that cannot be turned into the config dataclass. `key`: the dotted key at fault."""

    def __init__(self, message: str, key: str | None = None, section: bool = False) -> None:
        super().__init__(message)
        self.key = key
        self.section = section  # `key` names a section whose __post_init__ refused its values


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing .yaml/.yml/.toml file to --config")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: unsupported config extension {suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: malformed {suffix[1:].upper()}{where}: {reason}; fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting only where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping (section), got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def config_key(f: dataclasses.Field) -> str:
    """The key a field has in files and overrides: its name, or `metadata["key"]` where the name cannot be used
    (e.g. `global_: GlobalConfig = field(..., metadata={"key": "global"})`, since `global` is a Python keyword)."""
    return f.metadata.get("key", f.name)


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {config_key(f): f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}", key=f"{prefix}{key}")
        name = fields[key].name
        try:
            kwargs[name] = _coerce(value, hints[name], f"{prefix}{key}")
        except ConfigError as exc:
            exc.key = exc.key or f"{prefix}{key}"
            raise
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config section '{prefix.rstrip('.') or cls.__name__}': {exc}",
                          key=prefix.rstrip("."), section=True) from exc


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is read as a YAML scalar (numbers, booleans, null, [lists])."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}': expected dotted.key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot read value {raw!r}: {exc}") from exc
    return key.strip(), _fix_yaml_floats(value)


_SCI_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML (YAML 1.1) reads `1e-3` as a string; turn such strings back into the float anyone means."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _SCI_FLOAT.match(node):
        return float(node)
    return node


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the file at `path` (if any), then `overrides`.

    Raises ConfigError (exit code 2 through common.cli) naming the dotted key for unknown keys, wrong types
    and malformed files.
    """
    data: dict[str, Any] = _fix_yaml_floats(_read_file(Path(path))) if path else {}
    data.pop(META_KEY, None)  # a run's resolved config.yaml loads back as it is
    overridden: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        overridden[key] = text
    try:
        return _build(cls, data)
    except ConfigError as exc:
        # Name what the user typed: the command-line override when the faulty key came from one, else the file.
        culprit = next((text for key, text in reversed(overridden.items()) if _caused_by(exc, key)), None)
        source = f"override '{culprit}' (command line): " if culprit else (f"{path}: " if path else "")
        raise ConfigError(f"{source}{exc}", key=exc.key) from exc


def _caused_by(exc: ConfigError, key: str) -> bool:
    """Whether the override of dotted `key` is what `exc` complains about."""
    if exc.key is None:
        return False
    if exc.section:  # a section's validation: the override must sit in it and be named in the message
        inside = exc.key == "" or key.startswith(exc.key + ".")
        return inside and re.search(rf"\b{re.escape(key.rsplit('.', 1)[-1])}\b", str(exc)) is not None
    return exc.key == key or exc.key.startswith(key + ".") or key.startswith(exc.key + ".")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a plain mapping with the same checks as a file (the `_meta` block is ignored)."""
    return _build(cls, {k: v for k, v in _fix_yaml_floats(dict(data)).items() if k != META_KEY})


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal written under a field (as litgpt and PEP 257 do)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_config(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every config key of `cls` as (dotted key, type, default, docstring), sections expanded, for `--help`."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    rows: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_config(tp, f"{prefix}{config_key(f)}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        default_text = yaml.safe_dump(to_dict(default), default_flow_style=True, width=10**6).strip()
        default_text = default_text.removesuffix("...").strip()
        type_text = str(tp).replace("typing.", "") if typing.get_origin(tp) else _type_name(tp)
        rows.append((f"{prefix}{config_key(f)}", type_text, default_text, docs.get(f.name, "")))
    return rows


def config_help(cls: type) -> str:
    """The table of config keys that `--help` prints."""
    rows = describe_config(cls)
    width = max((len(r[0]) for r in rows), default=0)
    lines = ["config keys (set in --config or as key=value; type, default, what it does):"]
    for key, tp, default, doc in rows:
        lines.append(f"  {key:<{width}}  {tp} = {default}" + (f"\n  {'':<{width}}    {doc}" if doc else ""))
    return "\n".join(lines)


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML (what `--print-config` prints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-safe types (Paths as strings, tuples as lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {config_key(f): plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(cfg)


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of `-`, `_` and `.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def installed_packages() -> dict[str, str]:
    """Every distribution importable in this interpreter, normalised name -> version, sorted (what the run used)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken install can leave metadata without a name
            found.setdefault(package_name(name), dist.version)
    return dict(sorted(found.items()))


def environment() -> dict[str, Any]:
    """Where a run ran: Python, OS, CPU kernels torch picked, threads, and every installed package's version.

    Two runs of one commit differ in their numbers when any of these differ (another numpy, another CPU kernel set);
    constraints.txt locks the packages, and this record says whether a given run honoured the lock.
    """
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": installed_packages(),
    }


def save_resolved_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml`: the resolved config plus package version, git commit, time and environment."""
    from common import __version__
    from common.io import atomic_write_text

    payload = to_dict(cfg)
    payload[META_KEY] = {
        "package_version": __version__,
        "git_commit": git_commit(),
        "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "environment": environment(),
    }
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(payload, sort_keys=False))
    return path
