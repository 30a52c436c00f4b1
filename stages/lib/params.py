"""Read params.yaml once, so that every stage sees the same typed values.

`dvc exp run -S lr=1e-5` writes `lr: 1e-05`; plain PyYAML (YAML 1.1) reads that as the *string*
"1e-05" because its float pattern needs a dot. Our loader also accepts exponent-only floats.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import CharsegError

PARAMS_FILE = Path("params.yaml")

_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path} not found: run stages from the repository root (where params.yaml is)")
    try:
        params = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CharsegError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise CharsegError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """A required params section, with a clear error naming it when absent."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise CharsegError(f"params.yaml has no '{name}:' section (see README.md, 'Parameters')")
    return value


def number(cfg: dict[str, Any], key: str, *, lo: float | None = None, hi: float | None = None,
           integer: bool = False, where: str = "") -> float | int:
    """A numeric param, range-checked, with an error that names the key and the allowed range."""
    name = f"{where}.{key}" if where else key
    if key not in cfg:
        raise CharsegError(f"params.yaml: '{name}' is missing")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CharsegError(f"params.yaml: '{name}' must be a number, got {value!r}")
    if integer and float(value) != int(value):
        raise CharsegError(f"params.yaml: '{name}' must be a whole number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CharsegError(f"params.yaml: '{name}' = {value} is outside [{lo}, {hi}]")
    return int(value) if integer else float(value)
