"""``med-idefics data vqa-rad | slake | path-vqa | roco | med-halt``: import a real dataset (data.importers)."""

from __future__ import annotations

import click

from med_idefics.cli.app import params_options
from med_idefics.cli.data import data_group
from med_idefics.data.sources import SOURCES

RELEASE_HELP = {
    "vqa-rad": " Or the official release (the folder with 'VQA_RAD Dataset Public.json' and 'VQA_RAD Image Folder/'), "
    "or the MEVF layout (trainset.json, testset.json).",
    "slake": "The SLAKE release: the folder with train.json, validate.json, test.json and imgs/.",
    "path-vqa": " Or the release's question files: the folder with {train,val,test}_vqa.pkl (images: --images).",
    "med-halt": " The released reasoning_fake.csv (no correct-answer column) is read as is.",
}


def import_options(name: str, *, with_splits: bool = True, with_images: bool = False):
    """The options every import command shares; ``name`` is the dataset (a key of SOURCES)."""
    spec = SOURCES[name]
    hub = (
        f"Hub id (default {spec.hub_id}; token from $HF_TOKEN), a local folder in its layout, "
        "or one .parquet/.json/.jsonl/.csv file holding one split."
        if spec.hub_id
        else ""
    )
    options = [
        click.option(
            "--source",
            default=None,
            required=spec.hub_id is None,
            metavar="HUB_ID_OR_PATH" if spec.hub_id else "PATH",
            help=hub + RELEASE_HELP.get(name, ""),
        ),
        click.option(
            "--limit",
            "limits",
            multiple=True,
            metavar="N|SPLIT=N",
            help="Keep the first N good records of every split, or of SPLIT only (repeatable).",
        ),
        click.option(
            "--root",
            default=None,
            type=click.Path(file_okay=False),
            help=f"Write <root>/{name}/<split>.parquet  [default: params data.root]",
        ),
        click.option("--no-dvc", is_flag=True, help="Do not `dvc add` the data root afterwards."),
    ]
    if with_images:
        options.append(
            click.option(
                "--images",
                default=None,
                type=click.Path(file_okay=False),
                help="The release's image folder, when it is not beside the question files.",
            )
        )
    if with_splits:
        options.insert(
            1,
            click.option(
                "--split",
                "splits",
                multiple=True,
                type=click.Choice(spec.splits),
                help=f"Split to import, repeatable  [default: {', '.join(spec.splits)}]",
            ),
        )

    def decorate(func):
        func = params_options(func)
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@data_group.command("vqa-rad")
@import_options("vqa-rad", with_images=True)
def vqa_rad_command(params, **options) -> None:
    """Import VQA-RAD (radiology VQA; the source's own answer_type when it has one, else closed = yes/no).

    Official release: train = phrase_type freeform + para (1,797), test = test_freeform + test_para (451).
    """
    _run("vqa-rad", params, **options)


@data_group.command("slake")
@import_options("slake", with_images=True)
@click.option("--lang", default="en", type=click.Choice(["en", "zh"]), help="SLAKE's question language (q_lang).")
def slake_command(params, **options) -> None:
    """Import SLAKE 1.0 from its release (one language; modality, location, content_type kept as extra columns)."""
    _run("slake", params, **options)


@data_group.command("path-vqa")
@import_options("path-vqa", with_images=True)
def path_vqa_command(params, **options) -> None:
    """Import PathVQA (pathology VQA; the out-of-distribution test set). Release split val is stored as validation."""
    _run("path-vqa", params, **options)


@data_group.command("roco")
@import_options("roco")
def roco_command(params, **options) -> None:
    """Import ROCO radiology captions as records: question = params data.caption_prompt, answer = the caption.

    The paper used the first 55,000 train and 5,000 validation images: --limit train=55000 --limit validation=5000.
    """
    _run("roco", params, **options)


@data_group.command("med-halt")
@import_options("med-halt", with_splits=False)
@click.option(
    "--config", default=SOURCES["med-halt"].config, help="Med-HALT config; stored as data/med-halt/<config>.parquet."
)
def med_halt_command(params, config: str, **options) -> None:
    """Import Med-HALT's nonsense (fake) questions: text only; answer = correct_answer where a copy has one, else
    the "I do not know" option (the released reasoning_fake.csv: every question is nonsense)."""
    _run("med-halt", params, config=config, **options)


def _run(
    name: str,
    params,
    source: str | None,
    limits: tuple[str, ...],
    root: str | None,
    no_dvc: bool,
    splits: tuple[str, ...] = (),
    config: str | None = None,
    images: str | None = None,
    lang: str = "en",
) -> None:
    from med_idefics.data.importers import import_dataset
    from med_idefics.data.sources import TEXT
    from med_idefics.data.versioning import dvc_track
    from med_idefics.modeling.processors import token_counter

    root = root or params.data.root
    chosen = splits or tuple(SOURCES[name].plan(config=config))
    counter, why = token_counter(params) if SOURCES[name].kind != TEXT else (None, "")
    if why:
        click.echo(f"token lengths not counted: {why}")
    reports = import_dataset(
        name,
        root,
        caption_prompt=params.data.caption_prompt,
        source=source,
        splits=splits or None,
        config=config,
        limits=_parse_limits(limits, chosen),
        images=images,
        lang=lang,
        counter=counter,
    )
    for report in reports.values():
        click.echo(report.summary())
        click.echo(f"  → {report.path}")
    if not no_dvc:
        md5 = dvc_track(root)
        if md5:
            click.echo(f"data.dvc: {md5}")


def _parse_limits(values: tuple[str, ...], splits: tuple[str, ...]) -> dict[str, int]:
    """``N`` (every split) and ``SPLIT=N`` → {split: N}; a SPLIT=N overrides a bare N whatever the order."""
    everywhere, per_split = {}, {}
    for value in values:
        split, _, number = value.rpartition("=")
        try:
            n = int(number)
        except ValueError:
            n = 0
        if n <= 0:
            raise click.BadParameter(f"{value!r}: expected N or SPLIT=N, N a positive integer", param_hint="--limit")
        if split:
            per_split[split] = n
        else:
            everywhere = dict.fromkeys(splits, n)
    return everywhere | per_split
