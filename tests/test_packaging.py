"""Every configuration file the project ships is loaded here: pyproject.toml and conda.yaml agree, params.yaml and
every configs/**/*.yaml build a valid Params, the two profiles are mirror images, and the paper profile holds the
paper's numbers."""

from __future__ import annotations

import importlib
import math
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from med_idefics.config import ConfigError, Params, build, deep_merge, flatten, load_params
from med_idefics.workflow.profiles import EXTENDS, apply_profile, overlay_chain, switch_profile

REQUIRED = ["mlflow", "transformers", "peft", "bitsandbytes", "torch", "datasets", "dvc", "click", "scikit-learn"]
REQUIRED += ["nltk", "accelerate", "pillow"]


@pytest.fixture
def pyproject(repo_root) -> dict:
    return tomllib.loads((repo_root / "pyproject.toml").read_text())


def pins(requirements: list[str]) -> dict[str, str]:
    """Canonical package name → its version specifier, e.g. {"ruamel-yaml": "==0.19.1"}."""
    parsed = [Requirement(line) for line in requirements]
    assert len({canonicalize_name(r.name) for r in parsed}) == len(parsed), f"a package is listed twice: {requirements}"
    return {canonicalize_name(r.name): str(r.specifier) for r in parsed}


def conda_pip_section(repo_root) -> list[str]:
    env = yaml.safe_load((repo_root / "conda.yaml").read_text())
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return pip


def test_conda_env_pins_exactly_the_pyproject_dependencies(pyproject, repo_root):
    pip = conda_pip_section(repo_root)
    packages = [line for line in pip if not line.startswith(("-e", "."))]
    assert pins(packages) == pins(pyproject["project"]["dependencies"])
    assert "-e ." in pip  # the project itself, so `med-idefics` exists in the MLflow environment


def test_conda_env_python_satisfies_requires_python(pyproject, repo_root):
    env = yaml.safe_load((repo_root / "conda.yaml").read_text())
    assert env["name"] == "med-idefics"
    assert "conda-forge" in env["channels"]
    pythons = [d.split("=", 1)[1] for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert len(pythons) == 1
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(pythons[0])
    assert "pip" in env["dependencies"]


def test_the_issue_dependencies_are_declared(pyproject):
    declared = pins(pyproject["project"]["dependencies"])
    assert sorted(set(REQUIRED) - set(declared)) == []
    assert declared["torch"] == "==2.13.0"


def test_no_dependency_is_unpinned(pyproject):
    groups = {"dependencies": pyproject["project"]["dependencies"]}
    groups |= {f"optional {k}": v for k, v in pyproject["project"].get("optional-dependencies", {}).items()}
    for group, requirements in groups.items():
        for line in requirements:
            operators = {spec.operator for spec in Requirement(line).specifier}
            exact = operators & {"==", "===", "~="}
            bounded = operators & {"<", "<="} and operators & {">", ">="}
            assert exact or bounded, f"{group}: {line!r} is not pinned (use == or a bounded range)"


def test_console_script_resolves_to_the_cli(pyproject):
    target = pyproject["project"]["scripts"]["med-idefics"]
    module, _, attribute = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


# --------------------------------------------------------------------------------------------------------------------
# params.yaml and the profiles


def config_files(repo_root):
    return sorted((repo_root / "configs").glob("**/*.yaml"))


def test_params_yaml_loads(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.profile in {p.stem for p in config_files(repo_root)}


def test_every_config_builds_over_params(repo_root):
    """A profile's file is named by its ``profile`` key; a file named otherwise refines that profile
    (``paper-smoke`` → ``paper``) and builds over it."""
    files = config_files(repo_root)
    assert {"paper", "demo", "paper-fast"} <= {p.stem for p in files}
    base = yaml.safe_load((repo_root / "params.yaml").read_text())
    for path in files:
        params = build(Params, apply_profile(base, path.stem, repo_root / "configs"))
        overlay = yaml.safe_load(path.read_text()) or {}
        # a profile's file names it; an overlay may stay the profile it extends (paper-smoke: the paper's, smaller)
        assert params.profile in (path.stem, overlay.get(EXTENDS)), f"{path}: profile key should name the file"
    assert [p.name for p in overlay_chain("paper-fast", repo_root / "configs")] == ["paper.yaml", "paper-fast.yaml"]


def test_the_paper_smoke_overlay_is_the_paper_profile_with_its_base_and_sizes_only(repo_root, tmp_path):
    params_file = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", params_file)
    smoke = switch_profile("paper-smoke", params_file, repo_root / "configs")  # from the demo: paper, then its overlay
    assert (smoke.profile, smoke.model.base, smoke.quantization.load_in_4bit) == ("paper", "tiny-real-processor", True)
    paper = build(Params, apply_profile(yaml.safe_load((repo_root / "params.yaml").read_text()), "paper",
                                        repo_root / "configs"))  # fmt: skip
    differ = {k for k, v in smoke.flat().items() if paper.flat()[k] != v}
    assert differ and differ <= overlay_keys(repo_root, "paper-smoke") and "quantization.load_in_4bit" not in differ


def overlay_keys(repo_root, name) -> set[str]:
    overlay = yaml.safe_load((repo_root / "configs" / f"{name}.yaml").read_text())
    overlay.pop(EXTENDS, None)
    return set(flatten(overlay))


def test_paper_and_demo_name_the_same_keys_and_every_other_overlay_only_theirs(repo_root):
    """Switching back to demo (or to paper) must undo every key another profile set."""
    assert overlay_keys(repo_root, "paper") == overlay_keys(repo_root, "demo")
    for path in config_files(repo_root):
        extra = overlay_keys(repo_root, path.stem) - overlay_keys(repo_root, "demo")
        assert not extra, f"{path} sets {sorted(extra)}, which configs/demo.yaml and configs/paper.yaml do not name"


def test_paper_fast_is_the_paper_profile_with_the_speed_levers(repo_root):
    base = yaml.safe_load((repo_root / "params.yaml").read_text())
    paper = build(Params, apply_profile(base, "paper", repo_root / "configs"))
    fast = build(Params, apply_profile(base, "paper-fast", repo_root / "configs"))
    assert fast.model.base == paper.model.base and fast.data == paper.data and fast.sweep == paper.sweep
    assert fast.quantization.load_in_4bit is False and fast.quantization.compute_dtype == "bfloat16"
    assert fast.lora.dropout == 0.0 and fast.vision_cache.enabled
    for stage in ("stage1", "stage2", "single_stage"):
        fast_recipe, paper_recipe = getattr(fast, stage), getattr(paper, stage)
        assert fast_recipe.torch_compile and not paper_recipe.torch_compile
        # the same examples per optimizer step: the same steps and schedule as the paper's recipe
        assert fast_recipe.micro_batch * fast_recipe.grad_accum == paper_recipe.micro_batch * paper_recipe.grad_accum
        assert (fast_recipe.lr, fast_recipe.epochs) == (paper_recipe.lr, paper_recipe.epochs)


def comments(text: str) -> list[str]:
    """The commented lines, whitespace-normalised (ruamel keeps a comment's column after a longer value)."""
    return [" ".join(line.split()) for line in text.splitlines() if "#" in line]


def test_switching_profile_and_back_restores_params(repo_root, tmp_path):
    params_file = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", params_file)
    shutil.copytree(repo_root / "configs", tmp_path / "configs")
    original = params_file.read_text()
    current = yaml.safe_load(original)["profile"]
    others = sorted({p.stem for p in config_files(repo_root)} - {current})  # paper-smoke too: it says profile paper
    assert others, "only one profile"
    for other in others:
        named = yaml.safe_load((repo_root / "configs" / f"{other}.yaml").read_text())["profile"]
        assert switch_profile(other, params_file, tmp_path / "configs").profile == named
        assert load_params(params_file).profile == named
        switch_profile(current, params_file, tmp_path / "configs")
        assert yaml.safe_load(params_file.read_text()) == yaml.safe_load(original)
        assert comments(params_file.read_text()) == comments(original), "comments were lost"


def test_paper_profile_holds_the_papers_numbers(repo_root):
    base = yaml.safe_load((repo_root / "params.yaml").read_text())
    paper = build(Params, deep_merge(base, yaml.safe_load((repo_root / "configs" / "paper.yaml").read_text())))
    assert paper.model.base == "HuggingFaceM4/idefics2-8b"
    assert paper.model.do_image_splitting is False
    assert (paper.data.captions.train_size, paper.data.captions.eval_size) == (55_000, 500)  # eval: a logged loss
    assert paper.stage1.epochs == 3
    assert paper.stage1.lr == 1e-5
    assert paper.stage2.epochs == 2
    assert paper.stage2.lr == 1e-4
    for stage in (paper.stage1, paper.stage2):
        recipe = (stage.micro_batch, stage.eval_batch, stage.grad_accum, stage.weight_decay, stage.warmup_steps)
        assert recipe == (2, 8, 8, 0.01, 50)
    assert (paper.lora.r, paper.lora.dropout, paper.lora.init) == (8, 0.1, "gaussian")
    assert paper.quantization.load_in_4bit is True
    assert paper.quantization.quant_type == "nf4"


def test_no_sweep_point_of_a_shipped_profile_repeats_two_stage(repo_root):
    """A sweep point at the full stage-1 size is stage1 + stage2 again (same params, data and seed): the paper's
    55,000 cost ~11-13 GPU-hours for a point Figure 3 takes from two-stage anyway."""
    base = yaml.safe_load((repo_root / "params.yaml").read_text())
    for profile in ("demo", "paper"):
        params = build(
            Params, deep_merge(base, yaml.safe_load((repo_root / "configs" / f"{profile}.yaml").read_text()))
        )
        full = params.data.captions.train_size or params.data.demo.n_caption_train
        assert params.sweep.sizes and all(0 < n < full for n in params.sweep.sizes), (profile, params.sweep.sizes)


def test_stage1_in_training_evaluation_is_under_a_tenth_of_its_training_samples(repo_root):
    """The stage-1 eval loss is only logged: on the paper's 5,000 captions every 250 steps it was 42 evaluations per
    full run, 665,000 forward passes across the pipeline (~8-15 GPU-hours). Checked for every stage-1 training of
    the paper profile: two-stage's and each sweep point's (the Trainer also evaluates at the last step)."""
    base = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = build(Params, deep_merge(base, yaml.safe_load((repo_root / "configs" / "paper.yaml").read_text())))
    captions, recipe = params.data.captions, params.stage1
    for n in (captions.train_size, *params.sweep.sizes):
        samples = recipe.epochs * n
        steps = math.ceil(samples / (recipe.micro_batch * recipe.grad_accum))
        evaluations = steps // recipe.eval_steps + (steps % recipe.eval_steps > 0)
        assert evaluations * captions.eval_size < 0.10 * samples, (n, evaluations, captions.eval_size, samples)


def test_a_sweep_size_at_the_full_stage1_size_is_refused_naming_the_key(repo_root):
    overrides = {"data.captions.train_size": 500, "sweep.sizes": [100, 500]}
    with pytest.raises(ConfigError, match=r"sweep\.sizes.*500.*two-stage"):
        load_params(repo_root / "params.yaml", overrides)
    assert load_params(repo_root / "params.yaml", overrides | {"sweep.sizes": [100, 499]}).sweep.sizes == [100, 499]
    with pytest.raises(ConfigError, match=r"sweep\.sizes"):
        load_params(repo_root / "params.yaml", {"sweep.sizes": [0]})


# --------------------------------------------------------------------------------------------------------------------
# Invalid params are refused, naming the key


def write_params(tmp_path, repo_root, edit) -> Path:
    data = yaml.safe_load((repo_root / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["stage1"].update(lrr=1e-5), "stage1.lrr"),
        (lambda d: d["lora"].update(r="eight"), "lora.r"),
        (lambda d: d["quantization"].update(load_in_4bit="yes"), "quantization.load_in_4bit"),
        (lambda d: d["stage2"].update(lr=0.0), "stage2.lr"),
        (lambda d: d["stage1"].update(lr=-1e-5), "stage1.lr"),
        (lambda d: d["stage1"].update(epochs=0, max_steps=-1), "stage1.epochs"),
        (lambda d: d["single_stage"].update(micro_batch=0), "single_stage.micro_batch"),
        (lambda d: d["stage2"].update(eval_batch=0), "stage2.eval_batch"),
        (lambda d: d["lora"].pop("alpha"), "lora.alpha"),
    ],
    ids=["unknown-key", "wrong-type", "string-for-bool", "lr-zero", "lr-negative", "epochs-zero", "micro-batch-zero",
         "eval-batch-zero", "missing-key"],
)  # fmt: skip
def test_invalid_params_raise_naming_the_key(tmp_path, repo_root, edit, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_params(write_params(tmp_path, repo_root, edit))


def test_dvc_metrics_are_one_headline_file_and_the_rest_are_outputs(repo_root):
    """`dvc exp show` shows declared metrics as columns: one compact file of headline numbers (reports/headline.json,
    written by the report); the stages' own numbers (train_summary.json, metrics/<variant>/<suite>.json) and the
    run_info.json beside them are plain, uncached outputs."""
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    declared, plain = {}, {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        declared |= {next(iter(m)) if isinstance(m, dict) else m: name for m in body.get("metrics", [])}
        plain |= {next(iter(o)): o[next(iter(o))] for o in body.get("outs", []) if isinstance(o, dict)}
    assert declared == {"reports/headline.json": "report"}
    summaries = [path for path in plain if path.endswith("train_summary.json")]
    scores = [path for path in plain if path.startswith("metrics/") and not path.endswith("run_info.json")]
    ids = [path for path in plain if path.endswith("run_info.json")]
    assert len(summaries) >= 5 and len(scores) >= 8 and len(ids) >= 5, (summaries, scores, ids)
    assert all(plain[path] == {"cache": False} for path in summaries + scores + ids)


def test_the_slurm_backend_configs_load(repo_root):
    """configs/slurm-backend.json (our backend: cluster.slurm overrides) builds valid params; configs/mlflow-slurm.json
    (the conda case's plugin, the `cluster` extra) names only keys that plugin's batch template reads; both
    backends are registered with MLflow where installed."""
    import json

    from mlflow.projects.backend import loader

    ours = json.loads((repo_root / "configs" / "slurm-backend.json").read_text())
    assert set(ours) <= {"set", "log_dir"}
    params = load_params(repo_root / "params.yaml", ours["set"])
    assert params.cluster.slurm.train.minutes == 720 and params.cluster.slurm.gpus_per_training == 1
    assert type(loader.load_backend("med-idefics-slurm")).__name__ == "SlurmBackend"
    theirs = json.loads((repo_root / "configs" / "mlflow-slurm.json").read_text())
    template_keys = {"partition", "account", "exports", "gpus_per_node", "gres", "mem", "time", "nodes", "ntasks",
                     "exclusive", "modules", "environment", "sbatch-script-file"}  # fmt: skip
    assert set(theirs) <= template_keys and "HF_TOKEN" in theirs["exports"]  # the name: its value stays in the env
    if importlib.util.find_spec("mlflow_slurm") is None:
        pytest.skip("mlflow-slurm (the `cluster` extra) is not installed: its backend is not loaded here")
    assert type(loader.load_backend("slurm")).__name__ == "SlurmProjectBackend"
