"""The ``seer`` command: one module per sub-command under ``seer_cli.commands``."""

import warnings

import typer

from .commands import batch, distill, eval, generate, profile
from .config import apply_config_file
from .console import show_python_warning

app = typer.Typer(
    name="seer",
    help="Long-context LLM inference with SeerAttention block-sparse prefill.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("generate")(generate.generate)
app.command("distill")(distill.distill)
app.command("batch")(batch.batch)
app.command("eval")(eval.evaluate)
app.add_typer(profile.profile_app, name="profile")


@app.callback()
def root(ctx: typer.Context) -> None:
    """Long-context LLM inference with SeerAttention block-sparse prefill.

    Exit codes: 0 success, 1 user error, 2 usage error, 130 interrupted.
    """
    warnings.showwarning = show_python_warning
    apply_config_file(ctx)


def main() -> None:
    app()
