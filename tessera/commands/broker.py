"""``tessera broker``: start, stop and inspect the embedded Kafka-compatible broker."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tessera.broker import EmbeddedBroker, default_state_dir
from tessera.errors import BrokerError

_STATE_DIR_HELP = (
    "Directory holding broker.pid, broker.json and broker.log "
    "(default: $TESSERA_HOME/broker, else ./.tessera/broker)."
)


def _broker(state_dir: Path | None, port: int | None = None) -> EmbeddedBroker:
    return EmbeddedBroker(port=port, state_dir=state_dir or default_state_dir())


@click.group()
def broker() -> None:
    """Run the embedded Kafka-compatible broker (Tansu; data in memory only).

    The broker runs in the background after `start` returns; `stop` ends it and
    its data. In production, skip it and pass any Kafka cluster as --bootstrap.
    """


@broker.command()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="TCP port on 127.0.0.1 (default: a free port).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=_STATE_DIR_HELP,
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the broker to answer.",
)
def start(port: int | None, state_dir: Path | None, timeout_s: float) -> None:
    """Start the broker in the background and print its bootstrap address.

    Only the address goes to stdout, so `export TESSERA_BOOTSTRAP=$(tessera broker start)`
    works. Refuses to start a second broker in the same state directory.
    """
    try:
        info = _broker(state_dir, port).start(timeout_s=timeout_s)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"embedded broker started: pid {info.pid}, log {info.log_path}", err=True)
    click.echo(info.bootstrap)


@broker.command()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=_STATE_DIR_HELP,
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
def stop(state_dir: Path | None, timeout_s: float) -> None:
    """Stop the broker (its data is lost). Succeeds when none is running."""
    b = _broker(state_dir)
    pid = b.running_pid()
    try:
        stopped = b.stop(timeout_s=timeout_s)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    if stopped:
        click.echo(f"embedded broker stopped (pid {pid})")
    else:
        click.echo(f"no embedded broker running (state dir {b.state_dir})")


@broker.command()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=_STATE_DIR_HELP,
)
def status(state_dir: Path | None) -> None:
    """Say whether the broker runs and answers; exit code 0 if it does, 1 if not."""
    b = _broker(state_dir)
    info = b.status()
    if info is not None:
        click.echo(
            f"running: bootstrap {info.bootstrap}, pid {info.pid}, "
            f"started {info.started_at}, log {info.log_path}"
        )
        return
    pid = b.running_pid()
    if pid is not None:
        click.echo(
            f"not ready: process {pid} is alive but does not answer metadata requests; "
            f"see {b.log_path}"
        )
    else:
        click.echo(f"not running (state dir {b.state_dir}); start it with `tessera broker start`")
    sys.exit(1)
