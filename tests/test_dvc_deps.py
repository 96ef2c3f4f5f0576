"""Each dvc.yaml stage depends on every project module its command can run, found by a static import graph: a change
to any of them must re-run the stage. Generic over dvc.yaml (plain and ``foreach`` stages alike)."""

from __future__ import annotations

import ast
import inspect
import shlex
import textwrap
from pathlib import Path

import click
import pytest
import yaml

from med_idefics.cli import main

PACKAGE = "med_idefics"


def _stages(repo_root: Path) -> dict[str, dict]:
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}  # foreach: the `do` template


def _command_callback(cmd: str):
    """The click callback a stage's ``med-idefics …`` command line runs."""
    argv = shlex.split(cmd)
    assert argv[0] == "med-idefics", f"not a med-idefics command: {cmd}"
    command: click.Command = main
    for word in argv[1:]:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command = command.commands[word]
    return command.callback


def _imported_modules(tree: ast.AST, src: Path) -> set[str]:
    """Project modules named by the import statements anywhere in ``tree`` (lazy, function-level imports too)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == PACKAGE and _module_file(name, src) is not None:
                found.add(name)
    return found


def _module_file(module: str, src: Path) -> Path | None:
    path = src / Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def stage_modules(cmd: str, src: Path) -> set[Path]:
    """Source files (relative to the repo) of the project modules the stage's command imports, transitively;
    the ``cli`` layer and package ``__init__`` files are not stage logic and are left out."""
    callback = inspect.unwrap(_command_callback(cmd))
    pending = _imported_modules(ast.parse(textwrap.dedent(inspect.getsource(callback))), src)
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen or module.startswith(f"{PACKAGE}.cli"):
            continue
        seen.add(module)
        pending |= _imported_modules(ast.parse(_module_file(module, src).read_text()), src)
    files = {_module_file(module, src) for module in seen}
    return {f.relative_to(src.parent) for f in files if f.name != "__init__.py"}


def test_the_import_graph_finds_lazy_imports(repo_root):
    modules = {str(p) for p in stage_modules("med-idefics train stage1", repo_root / "src")}
    assert "src/med_idefics/stages/train.py" in modules  # imported inside the CLI function
    assert "src/med_idefics/modeling/lora.py" in modules  # imported inside train._train
    assert "src/med_idefics/data/images.py" in modules  # through the collator
    assert not any(m.startswith("src/med_idefics/cli/") for m in modules)


@pytest.mark.parametrize("stage", sorted(_stages(Path(__file__).resolve().parents[1])))
def test_every_stage_depends_on_every_module_it_imports(repo_root, stage):
    spec = _stages(repo_root)[stage]
    deps = {Path(dep) for dep in spec.get("deps", [])}
    needed = stage_modules(spec["cmd"], repo_root / "src")
    covered = {m for m in needed if any(m == d or d in m.parents for d in deps)}
    missing = sorted(str(m) for m in needed - covered)
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not list them in its deps"


def test_the_base_does_not_depend_on_the_stage1_training_size(repo_root):
    """`base` pretrains on the whole caption split: a stage-1 size change must not re-pretrain it."""
    params = [p if isinstance(p, str) else next(iter(p)) for p in _stages(repo_root)["base"]["params"]]
    key = "data.captions.train_size"
    assert not [p for p in params if key == p or key.startswith(p + ".")], f"base depends on {key} via {params}"


def resolved_stages(repo_root: Path, tmp_path: Path, profile: str) -> dict:
    """dvc.yaml's stages as DVC resolves them under ``profile`` (params.yaml + configs/<profile>.yaml)."""
    from dvc.repo import Repo

    from med_idefics.config import deep_merge

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = deep_merge(params, yaml.safe_load((repo_root / "configs" / f"{profile}.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((repo_root / "dvc.yaml").read_text())
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}, params


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_every_data_dependency_is_a_dataset_the_profile_imports(repo_root, tmp_path, profile):
    """`dvc repro` under the paper profile must not stop at a dataset its documented steps never create (data/demo)."""
    stages, params = resolved_stages(repo_root, tmp_path, profile)
    data = params["data"]
    imported = {data[source]["dataset"] for source in ("captions", "vqa", "ood", "nonsense")}
    allowed = {data["root"], *(f"{data['root']}/{name}" for name in imported)}
    for name, stage in stages.items():
        data_deps = {str(dep.def_path) for dep in stage.deps if str(dep.def_path).split("/")[0] == data["root"]}
        assert data_deps <= allowed, f"{profile}: stage {name} depends on {sorted(data_deps - allowed)}"


def _params_keys(stage) -> list[str]:
    return [key for dep in stage.deps if hasattr(dep, "params") for key in dep.params]


def test_each_sweep_point_is_a_stage1_a_stage2_and_an_evaluation_stage(repo_root, tmp_path):
    """One process, one model load per stage: stage 1 on N captions, stage 2 from its adapter, then its evaluation.
    A change to stage2 or eval params (or a crash in stage 2) never reruns a stage-1 training (~11 GPU-hours)."""
    stages, params = resolved_stages(repo_root, tmp_path, "paper")
    for n in params["sweep"]["sizes"]:
        commands = {name: stage.cmd for name, stage in stages.items() if name.endswith(f"@{n}")}
        assert sorted(commands.values()) == sorted([
            f"med-idefics train stage1 --train-size {n} --out outputs/stage1-n{n}",
            f"med-idefics train stage2 --init-adapter outputs/stage1-n{n}/adapter --out outputs/two-stage-n{n} "
            f"--variant two-stage-n{n}",
            f"med-idefics evaluate --variant two-stage-n{n} --suite vqa-rad,blank,validation,validation-blank "
            "--predictions-dir outputs/predictions --metrics-dir metrics",
        ]), commands  # fmt: skip
    for name, stage in stages.items():
        if any(key.split(".")[0] in ("stage2", "eval") for key in _params_keys(stage)):
            outs = [str(out.def_path) for out in stage.outs]
            assert not [out for out in outs if out.startswith("outputs/stage1")], (name, outs)


def test_the_blind_control_is_in_the_demo_only(repo_root, tmp_path):
    """The demo trains and evaluates the control that cannot see (params controls), for promotion's image gate to
    refuse; the paper profile spends no GPU hours on it."""
    (tmp_path / "demo").mkdir(), (tmp_path / "paper").mkdir()
    demo = {
        name.rsplit(":", 1)[-1]: stage
        for name, stage in resolved_stages(repo_root, tmp_path / "demo", "demo")[0].items()
    }
    assert demo["control_train@blind"].cmd == "med-idefics train blind --out outputs/blind"
    assert "--suite vqa-rad,blank,validation,validation-blank" in demo["control_evaluate@blind"].cmd
    paper, _ = resolved_stages(repo_root, tmp_path / "paper", "paper")
    assert not [name for name in paper if name.rsplit(":", 1)[-1].startswith("control")]


def test_an_empty_sweep_leaves_it_out_of_the_pipeline(repo_root, tmp_path):
    """`sweep.sizes: []`: no sweep stage, and report, register and promote (which read metrics/) need none."""
    import networkx as nx
    from dvc.repo import Repo

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["sweep"]["sizes"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((repo_root / "dvc.yaml").read_text())
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        names = {stage.name for stage in repo.index.stages}
        assert not [name for name in names if "sweep" in name], names
        for stage in repo.index.stages:
            if stage.name in ("report", "register", "promote"):
                assert not {s.name for s in nx.descendants(repo.index.graph, stage)} - names
                assert not [s.name for s in nx.descendants(repo.index.graph, stage) if "sweep" in s.name]
