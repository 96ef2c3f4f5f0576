"""Switch ``params.yaml`` between profiles (``configs/<profile>.yaml`` overlays), keeping its comments.

An overlay may start with ``extends: <profile>``: it is then applied on top of that profile's overlay (which may extend
another), e.g. ``configs/paper-fast.yaml`` on top of ``configs/paper.yaml``. Every key an overlay names must also be
named by ``configs/demo.yaml`` (the profile params.yaml holds), so that switching back restores params.yaml.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from med_idefics.config import CONFIGS_DIR, PARAMS_FILE, ConfigError, Params, build, deep_merge
from med_idefics.files import write_atomic


def available_profiles(configs_dir: str | Path = CONFIGS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(configs_dir).glob("*.yaml"))


EXTENDS = "extends"


def overlay_chain(name: str, configs_dir: str | Path = CONFIGS_DIR) -> list[Path]:
    """The overlay files that make profile ``name``, in the order they apply: what it extends first."""
    chain: list[Path] = []
    while name is not None:
        overlay_file = Path(configs_dir) / f"{name}.yaml"
        if not overlay_file.is_file():
            available = ", ".join(available_profiles(configs_dir))
            raise ConfigError(f"no profile {name!r}: {overlay_file} not found; available: {available}")
        if overlay_file in chain:
            raise ConfigError(f"{overlay_file}: `{EXTENDS}` loops back to a profile it extends")
        chain.insert(0, overlay_file)
        name = (yaml.safe_load(overlay_file.read_text()) or {}).get(EXTENDS)
    return chain


def apply_profile(params: dict[str, Any], name: str, configs_dir: str | Path = CONFIGS_DIR) -> dict[str, Any]:
    """``params`` (a params.yaml as a dict) with profile ``name``'s overlays applied; unknown keys raise."""
    for overlay_file in overlay_chain(name, configs_dir):
        overlay = yaml.safe_load(overlay_file.read_text()) or {}
        overlay.pop(EXTENDS, None)
        params = deep_merge(params, overlay)
    return params


def switch_profile(name: str, params_file: str | Path = PARAMS_FILE, configs_dir: str | Path = CONFIGS_DIR) -> Params:
    """Rewrite the keys that ``configs/<name>.yaml`` (and what it extends) names in ``params_file``; validate before
    writing anything."""
    params_file = Path(params_file)
    merged = apply_profile(yaml.safe_load(params_file.read_text()), name, configs_dir)
    params = build(Params, merged)  # raises naming the key before params.yaml is touched

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = rt.load(params_file.read_text())
    for overlay_file in overlay_chain(name, configs_dir):
        overlay = rt.load(overlay_file.read_text())
        overlay.pop(EXTENDS, None)
        _update_in_place(document, overlay)  # round-trip values keep their spelling
    text = io.StringIO()
    rt.dump(document, text)
    write_atomic(params_file, text.getvalue())
    return params


def _update_in_place(node: Any, overlay: dict[str, Any]) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict):
            _update_in_place(node[key], value)
        else:
            node[key] = value
