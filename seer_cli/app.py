"""The ``seer`` command: one module per sub-command under ``seer_cli.commands``."""

import typer

from .commands import distill, generate

app = typer.Typer(
    name="seer",
    help="Long-context LLM inference with SeerAttention block-sparse prefill.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("generate")(generate.generate)
app.command("distill")(distill.distill)


@app.callback()
def root() -> None:
    """Long-context LLM inference with SeerAttention block-sparse prefill.

    Exit codes: 0 success, 1 user error, 2 usage error, 130 interrupted.
    """


def main() -> None:
    app()
