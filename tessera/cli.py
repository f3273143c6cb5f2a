"""The ``tessera`` command line: one entry point, one subcommand group per capability."""

from __future__ import annotations

import importlib

import click

from tessera import __version__
from tessera.logs import configure_logging

# (module, attribute) of each subcommand; each module owns its group and its --help text.
_COMMANDS: list[tuple[str, str]] = [
    ("tessera.commands.broker", "broker"),
    ("tessera.commands.init", "init"),
    ("tessera.commands.topics", "topics"),
    ("tessera.commands.generate", "generate"),
    ("tessera.commands.features", "features"),
    ("tessera.commands.sequences", "sequences"),
    ("tessera.commands.worker", "worker"),
    ("tessera.commands.demo", "demo"),
    ("tessera.commands.serve", "serve"),
    ("tessera.commands.up", "up"),
    ("tessera.commands.up", "down"),
    ("tessera.commands.import_", "import_group"),
    ("tessera.commands.offline", "batch"),
    ("tessera.commands.offline", "backfill"),
    ("tessera.commands.offline", "replay"),
    ("tessera.commands.train", "train"),
    ("tessera.commands.consistency", "consistency"),
    ("tessera.commands.models", "models"),
    ("tessera.commands.simulate", "simulate"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tessera")
@click.option("--log-level", default=None, help="Log level (default INFO, or TESSERA_LOG_LEVEL).")
@click.option("--log-json/--no-log-json", default=None, help="Render logs as JSON lines.")
def cli(log_level: str | None, log_json: bool | None) -> None:
    """Tessera: real-time features and ranking for feeds.

    Manage the embedded Kafka broker and topics, generate a synthetic world of events,
    inspect feature definitions, and run the streaming workers.
    """
    configure_logging(level=log_level, json=log_json)


for _module, _attr in _COMMANDS:
    try:
        cli.add_command(getattr(importlib.import_module(_module), _attr))
    except ModuleNotFoundError as exc:  # a capability not built yet
        if exc.name != _module:
            raise


# Workers that live in their own modules (they import the worker group's helpers).
_WORKERS: list[tuple[str, str, str]] = [
    ("tessera.commands.archive", "archive_command", "archive"),
    ("tessera.commands.labels", "labels_command", "labels"),
]
_worker_group = cli.commands.get("worker")
if _worker_group is not None:
    for _module, _attr, _name in _WORKERS:
        _worker_group.add_command(getattr(importlib.import_module(_module), _attr), _name)


def main() -> None:
    """Run the command line."""
    cli(prog_name="tessera")


if __name__ == "__main__":
    main()
