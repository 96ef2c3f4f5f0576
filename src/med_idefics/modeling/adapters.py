"""Where a LoRA adapter lives: a folder, ``runs:/<run_id>/<path>``, ``models:/<name>/<version>`` or
``models:/<name>@<alias>``.

Every reference resolves to a local folder in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter reference cannot be used; the message says which and what to do."""


def is_remote(ref: str) -> bool:
    return ref.startswith(("runs:/", "models:/"))


def resolve_adapter(ref: str, missing_hint: str = "") -> Path:
    """A local PEFT adapter folder for ``ref``; MLflow references are downloaded (and cached by MLflow)."""
    if is_remote(ref):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        except Exception as err:  # mlflow raises several types for unknown runs/models/aliases
            raise AdapterError(f"cannot download adapter {ref}: {err}") from err
    else:
        local = Path(ref)
        if not local.exists():
            raise AdapterError(f"adapter {ref} not found. {missing_hint}".strip())
    found = find_adapter_dir(local)
    if found is None:
        raise AdapterError(f"{ref}: no {ADAPTER_CONFIG} in {local}; is this a PEFT adapter folder?")
    return found


def find_adapter_dir(root: Path) -> Path | None:
    if (root / ADAPTER_CONFIG).is_file():
        return root
    candidates = sorted(p.parent for p in root.rglob(ADAPTER_CONFIG))
    return candidates[0] if candidates else None


def check_adapter_fits(adapter_dir: Path, model) -> None:
    """Fail before training/evaluation when an adapter was made for a different base (shapes disagree)."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{adapter_dir}: {ADAPTER_WEIGHTS} missing")
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118  (safe_open is not a mapping)
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_name = key.split(".lora_")[0]
            module = _find_module(modules, module_name)
            shape = tuple(tensors.get_slice(key).get_shape())
            if module is None:
                raise AdapterError(
                    f"adapter {adapter_dir} was made for a different base: no module {module_name} here "
                    f"(adapter base: {config.get('base_model_name_or_path')}). Retrain it on this base."
                )
            in_f, out_f = _linear_dims(module)
            ok = shape[1] == in_f if ".lora_A." in key else shape[0] == out_f
            if not ok:
                raise AdapterError(
                    f"adapter {adapter_dir} was made for a different base: {key} has shape {shape}, but "
                    f"{module_name} here is {in_f}->{out_f} (adapter base: {config.get('base_model_name_or_path')}). "
                    "Retrain it on this base."
                )


def _find_module(modules: dict, saved_name: str):
    # PEFT saves keys as base_model.model.<path>; the model at hand may or may not be wrapped yet.
    for prefix in ("", "base_model.model."):
        name = saved_name.removeprefix("base_model.model.")
        if prefix + name in modules:
            return modules[prefix + name]
    return None


def _linear_dims(module) -> tuple[int, int]:
    base = getattr(module, "base_layer", module)
    return int(base.in_features), int(base.out_features)
