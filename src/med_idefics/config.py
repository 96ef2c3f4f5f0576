"""Typed, self-checking configuration loaded from ``params.yaml`` — the only source of hyperparameters.

Every section is a dataclass; :func:`load_params` turns the YAML into a :class:`Params` and raises
:class:`ConfigError` naming the dotted key for an unknown key, a missing key or a wrong type. Command-line and
MLproject options are *overrides* (``section.key=value``) applied with :func:`apply_overrides`, never second defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"
CONFIGS_DIR = "configs"


class ConfigError(ValueError):
    """A params file or override is invalid; the message names the key and what to do."""


@dataclass
class TinyModelConfig:
    """Layer sizes of the offline tiny Idefics2 (multiples of 64: bitsandbytes 4-bit on CPU needs that)."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    perceiver_latents: int
    perceiver_depth: int
    perceiver_heads: int
    perceiver_head_dim: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int


@dataclass
class PretrainConfig:
    """Full-parameter pretraining of the tiny base on the general domain (never on the medical splits)."""

    dataset: str
    train_split: str
    eval_split: str
    steps: int
    focus_steps: int  # the first steps train on the general split's dot records only (a curriculum), then on all
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    logging_steps: int


@dataclass
class ModelConfig:
    base: str  # a hub id, a local folder, "tiny" or "tiny-real-processor"
    base_dir: str  # where `med-idefics base` saves the resolved base (a DVC output)
    attn_implementation: (
        str  # transformers' attention kernel in training and evaluation: sdpa | eager | flash_attention_2
    )
    do_image_splitting: bool
    revision: str | None
    tiny: TinyModelConfig
    pretrain: PretrainConfig


@dataclass
class LoraConfig:
    r: int
    alpha: int
    dropout: float
    init: str  # peft `init_lora_weights`: "gaussian", "true", ...
    target_modules: str  # a regex over module names; never matches the vision encoder


@dataclass
class QuantizationConfig:
    load_in_4bit: bool  # true = QLoRA
    quant_type: str
    double_quant: bool
    compute_dtype: str


def precision_label(quantization: QuantizationConfig) -> str:
    """The precision of training and evaluation alike (:func:`med_idefics.modeling.loading.base_dtype`), as runs
    record it (param and tag ``precision``) and the report states it: ``4bit-nf4/bfloat16`` for a QLoRA base
    computing in bf16 (its other weights held in bf16), ``float32`` for a full-precision base in fp32."""
    dtype = quantization.compute_dtype
    return f"4bit-{quantization.quant_type}/{dtype}" if quantization.load_in_4bit else dtype


@dataclass
class SplitRef:
    dataset: str
    split: str


@dataclass
class TrainSource:
    dataset: str
    train_split: str
    eval_split: str
    train_size: int | None  # None = the whole split
    eval_size: int | None


VQA_SPLITS = ("official", "image-disjoint")  # data.vqa.split; the re-split lives in med_idefics.data.splits


@dataclass
class VqaSource(TrainSource):
    """The VQA data, and how its train/test split and an optional validation split are drawn."""

    split: str  # official | image-disjoint
    split_seed: int  # seeds the image-disjoint re-split and the validation carve-out
    validation_fraction: float  # 0 = no validation split; else this share of train's images is held out

    def __post_init__(self) -> None:
        if self.split not in VQA_SPLITS:
            raise ConfigError(f"data.vqa.split must be one of {', '.join(VQA_SPLITS)}; got {self.split!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.vqa.validation_fraction must be in [0, 1), got {self.validation_fraction}")


@dataclass
class DemoDataConfig:
    seed: int
    image_size: int
    n_general_images: int  # the base's general-domain pretraining pictures (~10 records each)
    n_general_validation_images: int
    n_caption_train: int
    n_caption_validation: int
    n_vqa_train_images: int
    n_vqa_test_images: int
    n_pathology_images: int
    n_nonsense: int


@dataclass
class DataConfig:
    root: str
    caption_prompt: str
    prompt_prefix: str
    captions: TrainSource
    vqa: VqaSource
    ood: SplitRef
    nonsense: SplitRef
    demo: DemoDataConfig


@dataclass
class StageConfig:
    epochs: float
    micro_batch: int
    eval_batch: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_steps: int  # -1 = derive from epochs
    save_steps: int
    eval_steps: int
    logging_steps: int
    precision: str  # auto | fp32 | bf16 | fp16
    gradient_checkpointing: bool
    dataloader_workers: int  # processes preparing batches (0 = in the training process)
    torch_compile: bool  # HF Trainer's torch_compile: the training model compiled by torch.compile


@dataclass
class SweepConfig:
    """The stage-1 size sweep (paper Figure 3): one stage-1, stage-2 and evaluation DVC stage per size."""

    sizes: list[int]  # stage-1 captions per point; [] leaves the sweep out of the pipeline entirely

    def __post_init__(self) -> None:
        bad = [n for n in self.sizes if n <= 0]
        if bad or len(set(self.sizes)) != len(self.sizes):
            raise ConfigError(f"sweep.sizes must be distinct sizes > 0, got {self.sizes}")


@dataclass
class EvalConfig:
    batch_size: int
    max_new_tokens: int
    expert_prompt: str
    bootstrap_resamples: int
    seed: int
    dataloader_workers: int  # processes preparing the images of answering batches (0 = in the process)


@dataclass
class VisionCacheConfig:
    """The frozen vision encoder's outputs, computed once per image and kept on disk
    (:mod:`med_idefics.modeling.vision_cache`)."""

    enabled: bool
    dir: str  # one folder per (base, processor settings, dtype); files keyed by the image's digest
    max_gib: float  # the whole folder's bound: a split is cached only when its images fit

    def __post_init__(self) -> None:
        if self.max_gib < 0:
            raise ConfigError(f"vision_cache.max_gib must be >= 0, got {self.max_gib}")


@dataclass
class MemoryConfig:
    """A training stage's peak GPU memory, predicted before it loads the model
    (:func:`med_idefics.modeling.measurements.fit_recipe`)."""

    fit: bool  # where the peak would not fit the GPU: split the micro-batch and/or turn on activation checkpointing
    headroom_gib: float  # kept free below the card's memory

    def __post_init__(self) -> None:
        if self.headroom_gib < 0:
            raise ConfigError(f"memory.headroom_gib must be >= 0, got {self.headroom_gib}")


@dataclass
class RegistryConfig:
    model_name: str
    alias: str
    suite: str
    metric: str
    require_significance: bool  # the champion moves only when the paired test says the candidate is better
    allow_uncommitted: bool  # versions from uncommitted work (DVC experiments, dirty trees) may be promoted
    min_image_reliance: float  # the image gate: closed accuracy on `suite` must drop this much without images, p < 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.min_image_reliance <= 1:
            raise ConfigError(f"registry.min_image_reliance must be in [0, 1], got {self.min_image_reliance}")


@dataclass
class MlflowConfig:
    tracking_uri: str | None  # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repo root
    experiment: str


# Control variants: `blind` (single-stage's recipe on blank images) cannot see; promotion's image gate must refuse it
CONTROLS = ("blind",)


@dataclass
class SlurmResources:
    """What one kind of job asks Slurm for (``--time``, ``--mem``, ``--cpus-per-task``)."""

    minutes: int  # sbatch --time, in minutes: a number, not "12:00:00", which YAML 1.1 (PyYAML) reads as seconds
    mem: str  # sbatch --mem, per node: 8G, 64000M
    cpus: int  # sbatch --cpus-per-task; the job's OMP_NUM_THREADS unless the environment sets one

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.minutes < 1:
            raise ConfigError(f"cluster.slurm.*: cpus and minutes must be >= 1, got {self.cpus} and {self.minutes}")


@dataclass
class SlurmConfig:
    """``med-idefics repro --slurm`` and ``seeds --slurm``: what each job asks the scheduler for. No stage reads
    these keys: changing them reruns nothing."""

    partition: str | None  # None = the cluster's default partition
    account: str | None
    qos: str | None
    gres: str  # the GPU generic resource: --gres=<gres>:<n> (gpu, or gpu:<type>)
    gpus_per_training: int  # 0 = CPU; >1 = torchrun, one process per GPU
    nodes_per_training: int  # >1: torchrun on each node, c10d rendezvous on the first
    gpus_per_evaluation: int  # 0 = CPU
    base: SlurmResources
    train: SlurmResources
    evaluate: SlurmResources
    other: SlurmResources  # report, register, promote: no GPU, whatever the profile
    seed: SlurmResources  # one seed's whole pipeline, a DVC experiment, as one job (`med-idefics seeds --slurm`)
    extra: list[str]  # further sbatch options, one per #SBATCH line, e.g. --constraint=a100
    requeue_signal_seconds: int  # training jobs: USR1 this long before the time limit, to checkpoint and requeue
    offline: bool  # jobs run with the hub offline: compute nodes without network read the login node's HF cache
    sqlite_single_node: bool  # allow a sqlite tracking store: only where every job runs on one node

    def __post_init__(self) -> None:
        for key in ("gpus_per_training", "gpus_per_evaluation", "requeue_signal_seconds"):
            if getattr(self, key) < 0:
                raise ConfigError(f"cluster.slurm.{key} must be >= 0, got {getattr(self, key)}")
        if self.nodes_per_training < 1:
            raise ConfigError(f"cluster.slurm.nodes_per_training must be >= 1, got {self.nodes_per_training}")
        if self.nodes_per_training > 1 and self.gpus_per_training < 1:
            raise ConfigError("cluster.slurm.nodes_per_training > 1 needs cluster.slurm.gpus_per_training >= 1")
        bad = [line for line in self.extra if not line.startswith("-")]
        if bad:
            raise ConfigError(f"cluster.slurm.extra: each entry is an sbatch option, like --constraint=a100; got {bad}")


@dataclass
class ClusterConfig:
    slurm: SlurmConfig


@dataclass
class Params:
    profile: str
    seed: int
    model: ModelConfig
    lora: LoraConfig
    quantization: QuantizationConfig
    data: DataConfig
    stage1: StageConfig
    stage2: StageConfig
    single_stage: StageConfig
    eval: EvalConfig
    registry: RegistryConfig
    mlflow: MlflowConfig
    vision_cache: VisionCacheConfig
    memory: MemoryConfig
    sweep: SweepConfig
    cluster: ClusterConfig
    controls: list[str]  # variants made to fail a check (CONTROLS); [] = none

    def __post_init__(self) -> None:
        for name in ("stage1", "stage2", "single_stage"):
            _check_stage(name, getattr(self, name))
        full = self.data.captions.train_size  # None: the whole split, checked when stage 1 reads it (train.py)
        repeats = [n for n in self.sweep.sizes if full is not None and n >= full]
        if repeats:
            raise ConfigError(
                f"sweep.sizes {repeats}: at or above data.captions.train_size ({full}) a sweep point is two-stage "
                f"(stage1 -> stage2) again, and Figure 3 takes that point from two-stage; use sizes below {full}"
            )
        unknown = [name for name in self.controls if name not in CONTROLS]
        if unknown or len(set(self.controls)) != len(self.controls):
            raise ConfigError(f"controls must be distinct names from {list(CONTROLS)}, got {self.controls}")
        if self.lora.r <= 0:
            raise ConfigError(f"lora.r must be > 0, got {self.lora.r}")
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        if self.eval.batch_size <= 0 or self.eval.max_new_tokens <= 0:
            raise ConfigError("eval.batch_size and eval.max_new_tokens must be > 0")
        if self.eval.dataloader_workers < 0:
            raise ConfigError(f"eval.dataloader_workers must be >= 0, got {self.eval.dataloader_workers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.key`` → value, e.g. for logging as MLflow params."""
        return flatten(self.to_dict())


def _check_stage(name: str, stage: StageConfig) -> None:
    positive = {"micro_batch": stage.micro_batch, "eval_batch": stage.eval_batch, "grad_accum": stage.grad_accum}
    positive |= {"save_steps": stage.save_steps, "eval_steps": stage.eval_steps, "logging_steps": stage.logging_steps}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}.{key} must be > 0, got {value}")
    if stage.lr <= 0:
        raise ConfigError(f"{name}.lr must be > 0, got {stage.lr}")
    if stage.epochs <= 0 and stage.max_steps <= 0:
        raise ConfigError(f"{name}.epochs must be > 0 (or set {name}.max_steps), got {stage.epochs}")
    if stage.dataloader_workers < 0:
        raise ConfigError(f"{name}.dataloader_workers must be >= 0, got {stage.dataloader_workers}")
    if stage.weight_decay < 0 or stage.warmup_steps < 0:
        raise ConfigError(f"{name}.weight_decay and {name}.warmup_steps must be >= 0")
    if stage.precision not in {"auto", "fp32", "bf16", "fp16"}:
        raise ConfigError(f"{name}.precision must be one of auto, fp32, bf16, fp16; got {stage.precision!r}")


# --------------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"unknown key(s) {keys}; known keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key {key}")
            continue
        values[name] = _coerce(hints[name], data[name], key)
    return cls(**values)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-5` — no dot — as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")  # a bug in this module, not in the user's params


# --------------------------------------------------------------------------------------------------------------------
# Loading, overriding, flattening


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] | dict[str, Any] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the repository root or pass --params")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return build(Params, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``section.key=value`` overrides applied (values parsed as YAML scalars)."""
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            key, raw = item.split("=", 1)
            if raw.strip():  # `key=` means "no override" (MLproject parameters default to empty); use key=null for None
                pairs[key.strip()] = yaml.safe_load(raw)
        overrides = pairs
    result = _deepcopy(data)
    for dotted, value in overrides.items():
        node = result
        *parents, last = dotted.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted}: {'.'.join(parents[: i + 1])} is not a section of params.yaml")
            node = node[part]
        if last not in node:
            raise ConfigError(f"override {dotted}: unknown key {dotted}")
        node[last] = value
    return result


def deep_merge(base: dict[str, Any], overlay: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``base`` updated by ``overlay``; every overlay key must already exist in ``base``."""
    result = _deepcopy(base)
    for key, value in overlay.items():
        dotted = _join(where, key)
        if key not in result:
            raise ConfigError(f"unknown key {dotted}")
        if isinstance(value, dict) and isinstance(result[key], dict):
            result[key] = deep_merge(result[key], value, dotted)
        else:
            result[key] = value
    return result


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = _join(prefix, key)
        if isinstance(value, dict):
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
