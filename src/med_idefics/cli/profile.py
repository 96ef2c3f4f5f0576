import click

from med_idefics.cli.app import main
from med_idefics.config import PARAMS_FILE


@main.command("profile")
@click.argument("name")
@click.option("--params", "params_file", default=PARAMS_FILE, type=click.Path(dir_okay=False))
def profile_command(name: str, params_file: str) -> None:
    """Switch params.yaml to profile NAME (`demo` or `paper`: the keys in configs/NAME.yaml)."""
    from med_idefics.workflow.profiles import switch_profile

    params = switch_profile(name, params_file)
    click.echo(
        f"{params_file}: profile {params.profile} (base {params.model.base}, "
        f"stage-1 data {params.data.captions.dataset}, 4-bit {params.quantization.load_in_4bit})"
    )
