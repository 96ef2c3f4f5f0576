import click

from med_idefics.cli.app import main, params_options


@main.command("tracking-uri")
@click.option("--ui", is_flag=True, help="Print how to open the store in MLflow's UI instead of the URI.")
@params_options
def tracking_uri_command(ui: bool, params) -> None:
    """Print the MLflow store the stages log to: params mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db at the repository root (relative sqlite paths anchored there)."""
    from med_idefics.tracking.store import resolve_tracking_uri, ui_hint

    uri = resolve_tracking_uri(params)
    click.echo(ui_hint(uri) if ui else uri)
