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
