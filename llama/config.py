"""Named configurations shipped with the package, and JSON reading with one-sentence errors.

The presets live in `llama/configs/` as package data, so every install has them:
    models/  architectures, the fields of Meta's params.json (7B, 13B, 33B, 65B, 20M, 60M, ...)
    train/   training configs (7B ... 65B with the paper's recipe, demo, tiny)
    data/    data mixtures (llama_mixture: Table 1 of the paper)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = {"models": "model preset", "train": "training config", "data": "data mixture"}
_ALIASES = {"models": {"30B": "33B"}}  # Meta's folder for the 33B model is called "30B"


def read_json_object(path: str | Path, missing: str | None = None) -> dict:
    """The JSON object in `path`; one clear sentence (`missing` when there is no file) instead of a traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing or f"{path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(d).__name__}")
    return d


def names(kind: str) -> list[str]:
    """The names of the shipped configs of `kind` ("models", "train" or "data")."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.json"))


def is_path(name: str | Path) -> bool:
    return str(name).endswith(".json") or Path(name).is_file()


def config_path(kind: str, name: str | Path) -> Path:
    """The JSON file for `name`: a path to a JSON file, or the name of a shipped config of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; choose one of {sorted(KINDS)}")
    if is_path(name):
        return Path(name)
    key = _ALIASES.get(kind, {}).get(str(name), str(name))
    path = CONFIG_DIR / kind / f"{key}.json"
    if not path.is_file():
        raise ValueError(f"unknown {KINDS[kind]} {name!r}; the shipped ones are {names(kind)} "
                         f"(or give a path to a JSON file)")
    return path


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce_fields(cls, d: dict, prefix: str = "") -> dict:
    """`d` with the values of `cls`'s bool, int and float fields (Optional ones too) made that type
    from what a command line or a hand-written JSON holds ("false", "12", "3e-4"), and a string for a
    list field split at commas ("a.json,b.json"), "null"/"none" None for an Optional field, null the
    default for another, a number a string for a str field; a value that is not
    one is a ValueError naming the key (after `prefix`) and the value. Other keys and fields are left
    as they are."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(d)
    for key, value in d.items():
        if key not in fields:
            continue
        kind = str(fields[key].type)
        optional = kind.startswith("Optional[") or kind == "Any"
        kind = kind[len("Optional["):-1] if kind.startswith("Optional[") else kind
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and optional:
            out[key] = None  # --export_dir null, --lora none: JSON's null written on a command line
        elif value is None and not optional and fields[key].default is not dataclasses.MISSING:
            out[key] = fields[key].default  # "time_budget_s": null in a JSON file: the default
        elif kind == "list" and isinstance(value, str):  # --eval_tasks a.json or a.json,b.json
            out[key] = [v.strip() for v in value.split(",") if v.strip()]
        elif kind == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = str(value)  # --out_dir 2024 (fire reads it as a number)
        elif kind in ("bool", "int", "float") and value is not None:
            out[key] = _coerce(prefix + key, value, kind)
    return out


def _coerce(key: str, value, kind: str):
    text = value.strip().lower() if isinstance(value, str) else None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(text) if kind == "float" or not text.lstrip("+-").isdigit() else int(text)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    if kind == "float":
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


class JsonConfig:
    """`from_json` and `from_name` for a config class with `from_dict(d, **overrides)`: `KIND` is
    its folder in llama/configs, `WHAT` how errors name it ("model config", "training config")."""

    KIND = ""
    WHAT = "config"

    @classmethod
    def from_json(cls, path: str | Path, **overrides):
        path = Path(path)
        d = read_json_object(path, f"no {cls.WHAT} at {path}")
        try:
            return cls.from_dict(d, **overrides)
        except (TypeError, ValueError) as e:
            if overrides:
                try:
                    cls.from_dict(d)
                except (TypeError, ValueError):
                    pass
                else:  # the file alone is fine: an override is to blame
                    raise ValueError(f"{e} (an override of {path.name}, e.g. a command-line flag)") from None
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_name(cls, name: str | Path, **overrides):
        """A config shipped in llama/configs/KIND by name, or a path to a JSON file."""
        return cls.from_json(config_path(cls.KIND, name), **overrides)
