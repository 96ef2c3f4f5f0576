"""A MkDocs hook (mkdocs.yml `hooks:`): generates the params and pipeline reference pages on every build.

Nothing here is written by hand: the params page walks the typed schema in ``med_idefics.config`` (each key's type,
its comment in config.py), with its value and comment in ``params.yaml`` (the demo profile) and under the paper
profile (``configs/paper.yaml`` applied); the pipeline page reads ``dvc.yaml``. The CLI page is rendered by
mkdocs-click from the click group itself (docs/reference/cli.md).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

from med_idefics import config as schema
from med_idefics.cli import main as cli_main
from med_idefics.config import Params
from med_idefics.workflow.profiles import EXTENDS, apply_profile, available_profiles

ROOT = Path(__file__).resolve().parents[2]
DEMO, PAPER = "demo", "paper"


# --------------------------------------------------------------------------------------------------------------------
# Comments: config.py's field comments (tokenize), YAML comments located by PyYAML's node marks


def field_comments(module: types.ModuleType) -> dict[tuple[str, str], str]:
    """(class name, field name) → the comment on the field's line(s) in the module's source."""
    source = inspect.getsource(module)
    by_line = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    comments = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                lines = range(stmt.lineno, stmt.end_lineno + 1)
                comments[cls.name, stmt.target.id] = " ".join(by_line[n] for n in lines if n in by_line)
    return comments


def yaml_comments(text: str) -> tuple[str, dict[tuple, str]]:
    """The file's header comment, and path (a tuple of keys and list indices) → the comments that belong to that
    node: the full-line comments right above its key, then the one after its value (or after its key, for a block)."""
    lines = text.splitlines()

    def after(line: int, column: int) -> str:
        rest = lines[line][column:].strip() if line < len(lines) else ""
        rest = rest[1:].strip() if rest.startswith(":") else rest
        return rest[1:].strip() if rest.startswith("#") else ""

    def above(line: int) -> list[str]:
        block = []
        while line > 0 and lines[line - 1].strip().startswith("#"):
            line -= 1
            block.insert(0, lines[line].strip()[1:].strip())
        return block if line > 0 else []  # a block that starts the file is the file's header

    def note(key: yaml.Node, value: yaml.Node) -> str:
        inline = isinstance(value, yaml.ScalarNode) or getattr(value, "flow_style", False)
        end = value.end_mark if inline and value.end_mark.line == key.start_mark.line else key.end_mark
        return " ".join([*above(key.start_mark.line), after(end.line, end.column)]).strip()

    comments: dict[tuple, str] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                comments[(*path, key.value)] = note(key, value)
                walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                if isinstance(item, yaml.ScalarNode):
                    comments[(*path, i)] = note(item, item)
                walk(item, (*path, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    header = []
    for line in lines:
        if not line.strip().startswith("#"):
            break
        header.append(line.strip()[1:].strip())
    return " ".join(header), comments


# --------------------------------------------------------------------------------------------------------------------
# Formatting


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else tp.__name__


def yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if value == "":
        return "''"
    return str(value)


def prose(text: str) -> str:
    """A comment as Markdown text: a placeholder such as ``metrics/<variant>/<suite>.json`` outside a code span shown as
    written, not swallowed as an HTML tag."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if part.startswith("`") else part.replace("<", "&lt;").replace(">", "&gt;") for part in parts)


def cell(text: str) -> str:
    """Markdown table cell text: pipes escaped, one line."""
    return prose(text).replace("|", "\\|").replace("\n", " ")


def code(value: str) -> str:
    """An inline code span for a table cell: Python-Markdown keeps a pipe inside a code span in its cell (escaping it
    would show the backslash); a backtick inside it widens the fence."""
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def own_docstring(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())  # dataclass's generated signature


def rst_to_md(text: str) -> str:
    """Docstrings use reST roles (:mod:`x`, ``x``); the page is Markdown."""
    text = re.sub(r":(?:mod|func|class|data|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


# --------------------------------------------------------------------------------------------------------------------
# The params page


def stages_reading(dvc: dict[str, Any]) -> dict[str, list[str]]:
    """dvc.yaml stage → the params keys (or sections) it lists."""
    reading = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        reading[name] = [p for p in body.get("params", []) if isinstance(p, str)]
    return reading


def readers(dotted: str, reading: dict[str, list[str]]) -> list[str]:
    return [s for s, keys in reading.items() if any(dotted == k or dotted.startswith(k + ".") for k in keys)]


def params_page(dvc: dict[str, Any]) -> str:
    params_text = (ROOT / schema.PARAMS_FILE).read_text()
    raw = yaml.safe_load(params_text)
    configs = ROOT / schema.CONFIGS_DIR
    demo, paper = apply_profile(raw, DEMO, configs), apply_profile(raw, PAPER, configs)
    header, params_notes = yaml_comments(params_text)
    _, paper_notes = yaml_comments((configs / f"{PAPER}.yaml").read_text())
    schema_notes = field_comments(schema)
    reading = stages_reading(dvc)

    out = [
        "# Params reference",
        "",
        "Generated from the typed schema in `src/med_idefics/config.py` (each key's type and comment), `params.yaml` "
        "(the **demo** profile's value and comment) and `configs/paper.yaml` applied on top of it (the **paper** "
        "column shows a value only where it differs from the demo's). *Read by* names the [pipeline stages]"
        "(pipeline.md) that list the key (or its section) in `dvc.yaml`: a change to it reruns them.",
        "",
        f"> `params.yaml`: {prose(header)}",
        "",
        "Override any key for one command with `--set section.key=value` "
        "(e.g. `med-idefics train stage2 --set stage2.lr=2e-4`), or for a DVC experiment with "
        "`dvc exp run -S section.key=value`. An unknown key or a wrong type is an error naming the key.",
        "",
    ]

    def table(cls: type, prefix: str, path: tuple[str, ...]) -> list[str]:
        rows = ["| Key · type | demo | paper | Why | Read by |", "|---|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                continue
            dotted = f"{prefix}{f.name}"
            demo_value, paper_value = lookup(demo, dotted), lookup(paper, dotted)
            why = [schema_notes.get((cls.__name__, f.name), ""), params_notes.get((*path, f.name), "")]
            if paper_notes.get((*path, f.name)):
                why.append(f"*paper:* {paper_notes[(*path, f.name)]}")
            stage_links = ", ".join(f"[{s}](pipeline.md#{s})" for s in readers(dotted, reading))
            rows.append(
                f"| `{dotted}`<br>*{type_name(tp).replace('|', '&#124;')}* | {code(yaml_value(demo_value))} | "
                f"{code(yaml_value(paper_value)) if paper_value != demo_value else ''} | "
                f"{cell(rst_to_md(' · '.join(w for w in why if w)))} | {stage_links} |"
            )
        return rows if len(rows) > 2 else []

    def section(cls: type, prefix: str, path: tuple[str, ...], parent: type | None, level: int) -> None:
        name = prefix.rstrip(".")
        if path:
            out.extend([f"{'#' * level} `{name}` {{#{name.replace('.', '-')}}}", ""])
            intro = [own_docstring(cls), params_notes.get(path, "")]
            if parent is not None:
                intro.insert(0, schema_notes.get((parent.__name__, path[-1]), ""))
            intro_text = " ".join(prose(rst_to_md(t)) for t in intro if t)
            out.extend([f"*{cls.__name__}.* {intro_text}".rstrip(), ""])
        rows = table(cls, prefix, path)
        if rows:
            out.extend([*rows, ""])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                section(hints[f.name], f"{prefix}{f.name}.", (*path, f.name), cls, min(level + 1, 3) if path else 2)

    out.extend(["## Top level", ""])
    section(Params, "", (), None, 2)
    out.extend(overlays_section(raw))
    return "\n".join(out) + "\n"


def overlays_section(raw: dict[str, Any]) -> list[str]:
    """The profiles other than demo and paper: the keys each overlay sets, on top of what it extends."""
    configs = ROOT / schema.CONFIGS_DIR
    out = [
        "## Other profiles",
        "",
        "`med-idefics profile <name>` applies `configs/<name>.yaml` (after the profile it `extends`) to "
        "`params.yaml`; `configs/demo.yaml` names every key any overlay sets, so `med-idefics profile demo` always "
        "restores the demo profile. Besides demo and paper:",
        "",
    ]
    for name in available_profiles(configs):
        if name in (DEMO, PAPER):
            continue
        text = (configs / f"{name}.yaml").read_text()
        overlay = yaml.safe_load(text) or {}
        header, notes = yaml_comments(text)
        extends = overlay.pop(EXTENDS, None)
        applied = apply_profile(raw, name, configs)
        out.extend([f"### `{name}`", ""])
        lead = f"Extends `{extends}`. " if extends else ""
        out.extend([f"{lead}{prose(header)}".strip(), "", "| Key | Value | Why |", "|---|---|---|"])
        for dotted in schema.flatten(overlay):
            path = tuple(dotted.split("."))
            out.append(f"| `{dotted}` | {code(yaml_value(lookup(applied, dotted)))} | {cell(notes.get(path, ''))} |")
        out.append("")
    return out


# --------------------------------------------------------------------------------------------------------------------
# The pipeline page


def cli_command(cmd: str) -> list[str]:
    """The command path (``["med-idefics", "train"]``) of the CLI command a stage's command line runs."""
    words = cmd.split()
    if not words or words[0] != "med-idefics":
        return []
    command, path = cli_main, ["med-idefics"]
    for word in words[1:]:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        command, path = sub, [*path, word]
    return path


def resolve_foreach(spec: Any, trees: dict[str, dict[str, Any]]) -> str:
    if isinstance(spec, list):
        return ", ".join(f"`{yaml_value(v)}`" for v in spec)
    if isinstance(spec, str) and spec.startswith("${") and spec.endswith("}"):
        key = spec[2:-1]
        values = "; ".join(f"{name}: `{yaml_value(lookup(tree, key))}`" for name, tree in trees.items())
        return f"params `{key}` ({values})"
    return f"`{spec}`"


def pipeline_page(dvc_text: str, dvc: dict[str, Any]) -> str:
    raw = yaml.safe_load((ROOT / schema.PARAMS_FILE).read_text())
    configs = ROOT / schema.CONFIGS_DIR
    trees = {DEMO: apply_profile(raw, DEMO, configs), PAPER: apply_profile(raw, PAPER, configs)}
    header, notes = yaml_comments(dvc_text)
    out = [
        "# Pipeline reference",
        "",
        "Generated from `dvc.yaml`: every stage's command, what it reads (params keys, data and upstream outputs, "
        "the source modules its command imports) and what it writes. `${…}` is DVC templating over `params.yaml`; "
        "a `foreach` stage is one stage per item, named `<stage>@<item>`. "
        "How to run it: [the pipeline](../pipeline.md).",
        "",
        f"> `dvc.yaml`: {prose(header)}",
        "",
    ]
    for name, stage in dvc["stages"].items():
        path = ("stages", name)
        body, base = (stage["do"], (*path, "do")) if "do" in stage else (stage, path)
        out.extend([f"## `{name}` {{#{name}}}", ""])
        if notes.get(path):
            out.extend([prose(notes[path]), ""])
        if "foreach" in stage:
            out.extend([f"One stage per item of {resolve_foreach(stage['foreach'], trees)}: `{name}@<item>`.", ""])
        cmd = " ".join(body["cmd"].split())
        out.extend([f"```bash\n{cmd}\n```", ""])
        command = cli_command(cmd)
        if command:  # mkdocs-click titles each command by its path; the heading's anchor joins it with dashes
            out.extend([f"Runs [`{' '.join(command)}`](cli.md#{'-'.join(command)}).", ""])
        out.extend(listing("Params", list(enumerate(body.get("params", []))), (*base, "params"), notes))
        deps = list(enumerate(body.get("deps", [])))
        reads = [(i, d) for i, d in deps if not d.startswith("src/")]
        out.extend(listing("Reads", reads, (*base, "deps"), notes))
        sources = [d for _, d in deps if d.startswith("src/")]
        modules = [d.removeprefix("src/").removesuffix(".py").replace("/", ".") for d in sources]
        if modules:
            out.extend([f"**Source modules** (a change reruns it): {', '.join(f'`{m}`' for m in modules)}", ""])
        for kind, title in (("outs", "Writes"), ("metrics", "Metrics"), ("plots", "Plots")):
            out.extend(listing(title, list(enumerate(body.get(kind, []))), (*base, kind), notes))
    if dvc.get("plots"):
        out.extend(["## Plots", "", "Top-level `plots:` (`dvc plots show`):", ""])
        for plot in dvc["plots"]:
            for plot_name, spec in plot.items():
                files = ", ".join(f"`{f}`" for f in spec.get("y", {}))
                out.append(f"- `{plot_name}`: {prose(spec.get('title', ''))} — {files}")
        out.append("")
    return "\n".join(out) + "\n"


def listing(title: str, items: list[tuple[int, Any]], path: tuple, notes: dict[tuple, str]) -> list[str]:
    """A bullet list of (index in the dvc.yaml list, entry): a path, or a path with its options; its comment after."""
    if not items:
        return []
    out = [f"**{title}**", ""]
    for i, item in items:
        if isinstance(item, dict):
            ((target, options),) = item.items()
            note = notes.get((*path, i, target), "")
            flags = ", ".join(f"{k}: {yaml_value(v)}" for k, v in (options or {}).items())
            text = f"- `{target}`" + (f" ({flags})" if flags else "")
        else:
            note, text = notes.get((*path, i), ""), f"- `{item}`"
        out.append(text + (f" — {prose(note)}" if note else ""))
    return [*out, ""]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated pages to the site's files, as if they were in docs/reference/."""
    dvc_text = (ROOT / "dvc.yaml").read_text()
    dvc = yaml.safe_load(dvc_text)
    pages = {"reference/params.md": params_page(dvc), "reference/pipeline.md": pipeline_page(dvc_text, dvc)}
    for path, text in pages.items():
        files.append(File.generated(config, path, content=text))
    return files


# The tags Python-Markdown writes for this site's pages; anything else in the CLI page is a placeholder of click's help
# text (`--variant <variant>`, `data/<dataset>/<split>.parquet`) that mkdocs-click passes through as raw HTML.
MARKDOWN_TAGS = {"a", "blockquote", "br", "code", "div", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "img", "li"}
MARKDOWN_TAGS |= {"ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"}


def on_page_content(html: str, page, config: MkDocsConfig, files: Files) -> str:
    """The CLI reference as click's help says it: placeholders (`<variant>`) shown, not taken for unknown (invisible)
    tags; no default where an option has none."""
    if page.file.src_uri != "reference/cli.md":
        return html

    def escape(match: re.Match) -> str:
        tag = match.group(2).lower()
        return match.group(0) if tag in MARKDOWN_TAGS else f"&lt;{match.group(1)}{match.group(2)}&gt;"

    html = re.sub(r"<(/?)([A-Za-z_][\w.-]*)>", escape, html)
    # click >= 8.3 marks "no default" with a sentinel that mkdocs-click 0.9.0 prints as a default (its open PR #95)
    return html.replace("<td><code>Sentinel.UNSET</code></td>", "<td></td>")
