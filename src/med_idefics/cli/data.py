import click

from med_idefics.cli.app import main, params_options


@main.group("data")
def data_group() -> None:
    """Write datasets into data/<dataset>/<split>.parquet (the one record schema) and update data.dvc."""


@data_group.command("demo")
@params_options
def demo_command(params) -> None:
    """Generate the offline demo dataset (seeded, byte-identical on every run) from params `data.demo`."""
    from med_idefics.data.demo import write_demo_dataset
    from med_idefics.data.versioning import dvc_track

    written = write_demo_dataset(params.data.root, params.data.demo, params.data.caption_prompt)
    for split, (path, count) in written.items():
        click.echo(f"{path}: {count} records ({split})")
    md5 = dvc_track(params.data.root)
    if md5:
        click.echo(f"data.dvc: {md5}")


@data_group.command("check")
@click.argument("dataset")
@click.option("--root", default=None, type=click.Path(file_okay=False), help="Data root  [default: params data.root]")
@click.option("--strict", is_flag=True, help="Exit with status 1 when train shares an image with test or validation.")
@params_options
def check_command(params, dataset: str, root: str | None, strict: bool) -> None:
    """Leakage between DATASET's splits: shared images (by content), duplicate (image, question, answer), questions
    without their image. The configured VQA dataset is checked as training and evaluation see it (data.vqa.split,
    data.vqa.validation_fraction), and any dataset as re-split when data.vqa.split asks for a re-split."""
    from med_idefics.data.leakage import check_splits, check_stored
    from med_idefics.data.splits import OFFICIAL, load_vqa_splits

    if root is not None:
        params.data.root = root
    vqa = params.data.vqa
    as_trained = dataset == vqa.dataset or vqa.split != OFFICIAL
    if as_trained and (vqa.split != OFFICIAL or vqa.validation_fraction > 0):
        vqa.dataset = dataset
        splits = load_vqa_splits(params)
        named = {"train": splits.train, "validation": splits.validation, "test": splits.test}
        report = check_splits(dataset, splits.name, {name: rows for name, rows in named.items() if rows})
    else:
        report = check_stored(params.data.root, dataset)
    click.echo(report.summary())
    if strict and report.train_shares_held_out_images:
        click.echo("leak: train shares images with a held-out split (see above)", err=True)
        raise SystemExit(1)
