"""Profiles as overlays: the schema's defaults are the default profile; `configs/<name>.yaml` holds only the
keys a profile changes. Rendering merges the two into the complete params.yaml DVC tracks, so every
value is declared once (in pipeline/config.py) and a profile is a short list of differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params, ParamsError, validate_params

CONFIGS = Path("configs")
HEADER = "# Rendered by `slimstep profile {name}`: the schema defaults (pipeline/config.py) + configs/{name}.yaml.\n"


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, one-line lists: how people write params files by hand."""


def _flow_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _flow_list)


def dump(tree: dict[str, Any]) -> str:
    return yaml.dump(tree, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value (lists included) replaces the base's."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def defaults() -> dict[str, Any]:
    return Params().model_dump(mode="json")


def available(configs: Path = CONFIGS) -> list[str]:
    return sorted(p.stem for p in configs.glob("*.yaml"))


def read_overlay(name: str, configs: Path = CONFIGS) -> dict[str, Any]:
    path = configs / f"{name}.yaml"
    if not path.exists():
        raise ParamsError(f"no profile {name!r}; available: {', '.join(available(configs))}")
    overlay = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overlay, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(overlay).__name__}")
    return overlay


def render(name: str, configs: Path = CONFIGS) -> dict[str, Any]:
    """The complete parameter set of a profile, validated (an overlay key the schema lacks is refused)."""
    merged = deep_merge(defaults(), {"profile": name, **read_overlay(name, configs)})
    return validate_params(merged, str(configs / f"{name}.yaml")).model_dump(mode="json")


def render_text(name: str, configs: Path = CONFIGS) -> str:
    """params.yaml as `slimstep profile` writes it: a header line, then every key in schema order."""
    return HEADER.format(name=name) + dump(render(name, configs))


def load_profile(name: str, configs: Path = CONFIGS) -> Params:
    return Params.model_validate(render(name, configs))
