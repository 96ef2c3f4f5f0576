"""The documentation site builds with no warning (`mkdocs build --strict`: no broken link or anchor), and its generated
reference names every CLI command (the click group walked, subcommands included), every params key (the typed schema
walked) and every dvc.yaml stage."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from html.parser import HTMLParser
from pathlib import Path

import click
import pytest
import yaml

from med_idefics.cli import main
from med_idefics.config import Params

ROOT = Path(__file__).resolve().parent.parent


def command_paths(group: click.Group, prefix: tuple[str, ...] = ("med-idefics",)) -> list[str]:
    paths = []
    for name, command in group.commands.items():
        paths.append(" ".join((*prefix, name)))
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
    return paths


def params_keys(cls: type = Params, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys.extend(params_keys(hints[field.name], f"{prefix}{field.name}."))
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


class _Texts(HTMLParser):
    """The text of every element of the given tags (headings less their permalink, code spans)."""

    def __init__(self, tags: set[str]) -> None:
        super().__init__()
        self.tags, self.open, self.texts = tags, [], []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.tags:
            self.open.append([])
        elif tag == "a" and ("class", "headerlink") in attrs and self.open:
            self.open[-1].append("\0")  # the permalink's ¶ follows: cut there

    def handle_endtag(self, tag: str) -> None:
        if tag in self.tags and self.open:
            self.texts.append("".join(self.open.pop()).split("\0")[0].strip())

    def handle_data(self, data: str) -> None:
        if self.open:
            self.open[-1].append(data)


def texts(html: str, tags: set[str]) -> set[str]:
    parser = _Texts(tags)
    parser.feed(html)
    return set(parser.texts)


HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


def missing_commands(cli_html: str) -> list[str]:
    titles = texts(cli_html, HEADINGS)
    return [path for path in command_paths(main) if path not in titles]


def missing_params(params_html: str) -> list[str]:
    spans = texts(params_html, {"code"})
    return [key for key in params_keys() if key not in spans]


def missing_stages(pipeline_html: str) -> list[str]:
    titles = texts(pipeline_html, HEADINGS)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [name for name in stages if name not in titles]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs' future, printed on every build
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    assert "WARNING" not in result.stderr, result.stderr[-4000:]
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def test_every_cli_command_has_its_section_in_the_reference(site: Path) -> None:
    html = page(site, "reference/cli")
    assert len(command_paths(main)) >= 20  # the walk itself found the group's commands and subcommands
    assert missing_commands(html) == []
    assert "Sentinel" not in html  # click's "no default" marker is not shown as a default
    # click's placeholders are shown as text, not swallowed as HTML tags
    assert "data/&lt;dataset&gt;/&lt;split&gt;.parquet" in html
    # the check finds a command whose section is gone
    one = "med-idefics data vqa-rad"
    assert missing_commands(html.replace(f">{one}<", ">gone<")) == [one]


def test_every_params_key_is_in_the_reference(site: Path) -> None:
    html = page(site, "reference/params")
    keys = params_keys()
    assert {"seed", "stage2.lr", "data.vqa.split", "model.tiny.vocab_size"} <= set(keys)
    assert missing_params(html) == []
    assert missing_params(html.replace("<code>stage2.lr</code>", "<code>gone</code>")) == ["stage2.lr"]


def test_every_pipeline_stage_is_in_the_reference(site: Path) -> None:
    html = page(site, "reference/pipeline")
    assert missing_stages(html) == []
    assert missing_stages(html.replace("<code>promote</code>", "<code>gone</code>")) == ["promote"]


def test_the_params_reference_shows_both_profiles_values(site: Path) -> None:
    """Values come from params.yaml and configs/paper.yaml as applied, not from a copy: a row holds both."""
    html = page(site, "reference/params")
    row = html[html.index("<code>model.base</code>") :].split("</tr>")[0]
    assert "<code>tiny</code>" in row and "<code>HuggingFaceM4/idefics2-8b</code>" in row
