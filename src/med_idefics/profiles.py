"""Switch ``params.yaml`` between profiles (``configs/<profile>.yaml`` overlays), keeping its comments."""

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


def switch_profile(name: str, params_file: str | Path = PARAMS_FILE, configs_dir: str | Path = CONFIGS_DIR) -> Params:
    """Rewrite the keys that ``configs/<name>.yaml`` names in ``params_file``; validate before writing anything.

    A file whose ``profile`` key names another profile refines that one (``paper-smoke`` → ``paper``) and applies
    only over it."""
    overlay_file = Path(configs_dir) / f"{name}.yaml"
    if not overlay_file.is_file():
        available = ", ".join(available_profiles(configs_dir))
        raise ConfigError(f"no profile {name!r}: {overlay_file} not found; available: {available}")
    params_file = Path(params_file)
    overlay = yaml.safe_load(overlay_file.read_text()) or {}
    refines, current = overlay.get("profile"), (yaml.safe_load(params_file.read_text()) or {}).get("profile")
    if refines not in (None, name) and current != refines:  # an overlay of a profile (paper-smoke refines paper)
        raise ConfigError(
            f"{overlay_file} refines the {refines} profile, and {params_file} holds profile {current}: "
            f"run `med-idefics profile {refines}` first"
        )
    merged = deep_merge(yaml.safe_load(params_file.read_text()), overlay)
    params = build(Params, merged)  # raises naming the key before params.yaml is touched

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = rt.load(params_file.read_text())
    _update_in_place(document, rt.load(overlay_file.read_text()))  # round-trip values keep their spelling
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
