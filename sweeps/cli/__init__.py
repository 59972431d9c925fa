"""The ``cxr-sweep`` command line (console entry point ``sweeps.cli:app``).

Commands live in one module per group: :mod:`.trial` (phantoms, train, demo), :mod:`.sweep`
(sweep run/resume/status), :mod:`.data` (segmenter, prepare, prior) and :mod:`.results` (best,
report, export, predict, ui); :mod:`.common` holds what they share, one way to fail included.
Commands import the library lazily, so ``--help`` and bad input answer quickly.
"""

from __future__ import annotations

import typer

from . import data, deliver, results, sweep, trial
from .common import plain_help_types

plain_help_types()

__all__ = ["app"]

app = typer.Typer(
    name="cxr-sweep",
    help="Sweeps for chest X-ray classifiers trained with a localization-aware attention loss.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"cxr-sweep {version('cxr-attention-sweeps')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("cxr-sweep (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _main(
    _: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Sweeps for chest X-ray classifiers trained with a localization-aware attention loss."""


trial.register(app)
app.add_typer(sweep.sweep_app, name="sweep")
data.register(app)
results.register(app)
deliver.register(app)
