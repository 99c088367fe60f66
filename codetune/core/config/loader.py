"""Reading a configuration: schema defaults, then a YAML file, then dot-list overrides, validated at once; and
writing one back (config.yaml, MLflow params)."""

from __future__ import annotations

import difflib
import inspect
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from codetune.core.config import schema
from codetune.core.config.schema import SCHEMA_KEYS, Config, _leaves, to_dict
from codetune.core.errors import ConfigError
from codetune.core.families import family_of
from codetune.core.validation import validate


def key_help() -> dict[str, str]:
    """Dotted key -> the one-line docstring under its field in schema.py (litgpt style)."""
    import ast

    docs: dict[tuple[str, str], str] = {}
    for node in ast.parse(inspect.getsource(schema)).body:
        if isinstance(node, ast.ClassDef):
            for stmt, after in zip(node.body, node.body[1:]):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                ):
                    docs[node.name, stmt.target.id] = " ".join(str(after.value.value).split())
    return {key: docs.get((owner.__name__, name), "") for key, (owner, name, _) in _leaves(Config).items()}


def _type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(m.value for m in annotation)
    if typing.get_origin(annotation) is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, list(SCHEMA_KEYS), n=1, cutoff=0.6)
    hint = f" — did you mean '{close[0]}'?" if close else " — run `codetune keys` to list valid keys"
    return f"unknown key '{key}' ({where}){hint}"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf value}."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    from omegaconf import OmegaConf

    values: dict[str, Any] = {}
    errors: list[str] = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"override '{item}' is not key=value (e.g. training.learning_rate=3e-4)")
            continue
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except Exception as exc:  # the value is parsed as YAML: yaml.YAMLError and OmegaConf's own
            errors.append(
                f"override '{item}' is not valid YAML ({str(exc).splitlines()[0]}); quote the value: {key}='...'"
            )
            continue
        values.update(_flatten(parsed))
    return values, errors


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file, then overrides; every error reported at once."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers: list[tuple[str, dict[str, Any]]] = []
    errors: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            shipped = ", ".join(sorted(str(p) for p in Path("configs").glob("*.yaml"))) or "none found here"
            raise ConfigError(f"config file '{path}' not found (shipped configs: {shipped})")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path)) or {}
        except Exception as exc:  # yaml.YAMLError and OmegaConf's own
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path} must hold a mapping of sections (model:, data:, ...), not {type(loaded).__name__}"
            )
        layers.append((str(path), _flatten(loaded)))
    override_values, override_errors = _parse_overrides(overrides)
    errors += override_errors
    layers.append(("override", override_values))

    merged = OmegaConf.structured(Config)
    for where, values in layers:
        for key, value in values.items():
            if key not in SCHEMA_KEYS:
                errors.append(unknown_key_message(key, where))
                continue
            if isinstance(value, str) and "${" in value:
                errors.append(
                    f"'{key}' ({where}) is an interpolation (${{...}}); codetune takes values as written, so a secret "
                    "in the environment is never copied into config.yaml, MLflow, S3 metadata or a model card: "
                    "write the value itself"
                )
                continue
            try:
                OmegaConf.update(merged, key, value, merge=False)
            except OmegaConfBaseException:
                errors.append(f"'{key}' ({where}) expects {_type_name(SCHEMA_KEYS[key])}, got {value!r}")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    cfg: Config = OmegaConf.to_object(merged)

    validate(cfg)
    if cfg.registry.model_name is None:
        cfg.registry.model_name = family_of(cfg.model).registered_name
    return cfg


def to_yaml(cfg: Config) -> str:
    # PyYAML, not OmegaConf: training writes this, and the GPU image has only torch/transformers/peft (and their
    # PyYAML).
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted key -> value, as MLflow params."""
    return _flatten(to_dict(cfg))
