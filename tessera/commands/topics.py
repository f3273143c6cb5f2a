"""``tessera topics``: create and list Kafka topics on the embedded broker or any cluster."""

from __future__ import annotations

from pathlib import Path

import click

from tessera.broker import resolve_bootstrap
from tessera.errors import TesseraError
from tessera.topics import DEFAULT_TOPIC_CONFIG, PLATFORM_TOPICS, create_topics, list_topics


def _bootstrap_options(f):  # type: ignore[no-untyped-def]
    f = click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="State directory of the embedded broker to use "
        "(default: $TESSERA_HOME/broker, else ./.tessera/broker).",
    )(f)
    return click.option(
        "--bootstrap",
        metavar="HOST:PORT[,...]",
        default=None,
        help="Kafka bootstrap servers (default: the running embedded broker, "
        "else $TESSERA_BOOTSTRAP).",
    )(f)


def _resolve(bootstrap: str | None, state_dir: Path | None) -> str:
    try:
        return resolve_bootstrap(bootstrap, state_dir=state_dir)
    except TesseraError as exc:
        raise click.ClickException(str(exc)) from exc


def _parse_config(items: tuple[str, ...]) -> dict[str, str]:
    config: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--config")
        config[key] = value
    return config


@click.group()
def topics() -> None:
    """Create and list Kafka topics (the platform's event streams by default)."""


@topics.command()
@_bootstrap_options
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Partitions of each new topic.",
)
@click.option(
    "--replication",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Replication factor of each new topic.",
)
@click.option(
    "--config",
    "config_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Topic config, repeatable (retention.ms=-1 and retention.bytes=-1 "
    "are always set unless overridden).",
)
@click.argument("names", nargs=-1)
def create(
    bootstrap: str | None,
    state_dir: Path | None,
    partitions: int,
    replication: int,
    config_items: tuple[str, ...],
    names: tuple[str, ...],
) -> None:
    """Create topics NAMES (default: the platform topics); existing ones are kept.

    Platform topics: views, engagements, impressions, items, deadletter.
    """
    address = _resolve(bootstrap, state_dir)
    wanted = list(names) or list(PLATFORM_TOPICS)
    config = {**DEFAULT_TOPIC_CONFIG, **_parse_config(config_items)}
    try:
        created = create_topics(
            address, wanted, partitions=partitions, replication=replication, config=config
        )
    except (TesseraError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    existing = [n for n in wanted if n not in created]
    if created:
        click.echo(f"created ({partitions} partitions): {', '.join(created)}")
    if existing:
        click.echo(f"already existed: {', '.join(existing)}")


@topics.command(name="list")
@_bootstrap_options
@click.option(
    "--all",
    "include_internal",
    is_flag=True,
    help="Include internal topics (names starting with __).",
)
def list_(bootstrap: str | None, state_dir: Path | None, include_internal: bool) -> None:
    """List topics and their partition counts, one per line: NAME<TAB>PARTITIONS."""
    address = _resolve(bootstrap, state_dir)
    try:
        found = list_topics(address, include_internal=include_internal)
    except TesseraError as exc:
        raise click.ClickException(str(exc)) from exc
    if not found:
        click.echo(f"no topics at {address}; create them with `tessera topics create`", err=True)
    for name, count in found.items():
        click.echo(f"{name}\t{count}")
