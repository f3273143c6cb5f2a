"""``tessera sequences get``: a user's most recent actions, as the sequences worker stored them."""

from __future__ import annotations

import json

import click

from tessera.home import STORE_DEFAULT_TEXT, default_store_url


@click.group("sequences")
def sequences() -> None:
    """Read the real-time user sequences (`tessera worker sequences` writes them)."""


@sequences.command("get")
@click.option("--user", "users", required=True, help="Comma-separated user ids, e.g. u1,u2.")
@click.option("--at", default=None,
              help="Only actions before this time: ISO-8601 or epoch ms (default: all).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many actions per user (newest first).")
@click.option("--store", "store_url", default=default_store_url, show_default=STORE_DEFAULT_TEXT,
              help="Online store URL.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def get(users: str, at: str | None, limit: int | None, store_url: str, as_json: bool) -> None:
    """Print each user's stored actions, newest first (ties: larger event id first)."""
    from features.errors import TesseraError
    from features.timeutil import parse_timestamp, to_iso
    from tessera.api import get_sequences

    ids = [u for u in users.split(",") if u]
    try:
        at_ms = parse_timestamp(at) if at else None
        seqs = get_sequences(ids, at=at_ms, limit=limit, store_url=store_url)
    except TesseraError as exc:
        raise click.ClickException(f"{exc} (run `tessera worker sequences` to fill a store)") \
            from exc
    if as_json:
        click.echo(json.dumps({u: rows for u, rows in zip(ids, seqs)}, indent=2))
        return
    for user, rows in zip(ids, seqs):
        click.echo(f"user {user}: {len(rows)} actions")
        for r in rows:
            click.echo(f"  {to_iso(r['ts'])}  {r['action']:<10} {r['item_id']:<16} "
                       f"dwell {r['dwell_ms']} ms  ({r['event_id']})")
