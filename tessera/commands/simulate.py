"""``tessera simulate``: synthetic users request feeds over HTTP and engage, closing the loop."""

from __future__ import annotations

import json
import math
import time

import click

from features.errors import TesseraError
from features.timeutil import parse_duration, parse_timestamp
from tessera.synth.world import DAY, DEFAULT_START_TS, WorldConfig


def _duration_s(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value) / 1000
    except TesseraError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("simulate")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="The serving endpoint.")
@click.option("--bootstrap", metavar="HOST:PORT[,...]", default=None,
              help="Kafka for view events (default: the running embedded broker, else "
                   "$TESSERA_BOOTSTRAP).")
@click.option("--no-views", is_flag=True, help="Do not produce view events to Kafka.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the world: the one given to `tessera generate`.")
@click.option("--users", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Users of the world (as given to `tessera generate`).")
@click.option("--items", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Items of the world (as given to `tessera generate`).")
@click.option("--authors", type=click.IntRange(min=1), default=None,
              help="Authors of the world (default: items / 20, as `tessera generate`).")
@click.option("--topics", "n_topics", type=click.IntRange(min=1), default=32, show_default=True,
              help="Item topics of the world.")
@click.option("--world-start", default=None, metavar="TIME",
              help="--start given to `tessera generate` (default 2026-11-01T00:00:00Z).")
@click.option("--world-days", type=click.FloatRange(min=0, min_open=True), default=7.0,
              show_default=True, help="--days given to `tessera generate`.")
@click.option("--sim-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the simulated users' draws (who comes, what they do).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Feed requests per second.")
@click.option("--tick", "tick_s", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Seconds between ticks (a tick sends rate x tick requests).")
@click.option("--duration", callback=_duration_s, default="60s", show_default=True,
              metavar="DURATION", help="How long to run (30s, 5m, 1h).")
@click.option("--max-requests", type=click.IntRange(min=1), default=None,
              help="Stop after this many feed requests.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Items per feed request.")
@click.option("--popularity-share", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of users (by crc32 of the user id) served by the popularity baseline.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Feed requests in flight at once.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="HTTP timeout per request, seconds.")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True,
              help="Simulated seconds per wall second (shrinks engagement delays).")
@click.option("--api-key", default=None, help="Sent as X-API-Key.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def simulate(
    url: str, bootstrap: str | None, no_views: bool, seed: int, users: int, items: int,
    authors: int | None, n_topics: int, world_start: str | None, world_days: float,
    sim_seed: int, rate: float, tick_s: float, duration: float | None,
    max_requests: int | None, limit: int, popularity_share: float, concurrency: int,
    timeout_s: float, time_scale: float, api_key: str | None, as_json: bool,
) -> None:
    """Play a synthetic world's users against a serving endpoint and report CTR.

    Users (drawn by activity) request their feed over HTTP, view what they are served
    (view events to Kafka) and engage according to their hidden preferences and position
    bias (POST /v1/events). The report gives requests, impressions, clicks, CTR, errors
    and latency per arm (model | baseline) and per L2 model version.

    Give the same world options as `tessera generate`, so items map back to the world.

    \b
    Examples:
      tessera simulate --rate 20 --duration 2m
      tessera simulate --popularity-share 0.5 --duration 10m --json
    """
    from tessera.broker import resolve_bootstrap
    from tessera.sim import Simulator, SimulatorConfig, TickStats

    duration_ms = max(60_000, round(world_days * DAY / 60_000) * 60_000)
    users_per_tick = max(1, math.ceil(rate * tick_s))
    try:
        world = WorldConfig(
            seed=seed, n_users=users, n_items=items,
            n_authors=authors if authors is not None else max(1, items // 20),
            n_topics=n_topics,
            start_ts=parse_timestamp(world_start) if world_start else DEFAULT_START_TS,
            duration_ms=duration_ms,
        )
        address = None if no_views else resolve_bootstrap(bootstrap)
        config = SimulatorConfig(
            base_url=url, bootstrap=address, world=world, users_per_tick=users_per_tick,
            tick_s=users_per_tick / rate, time_scale=time_scale, limit=limit,
            popularity_share=popularity_share, seed=sim_seed, max_requests=max_requests,
            request_timeout_s=timeout_s, concurrency=concurrency, api_key=api_key,
        )
        last = [time.monotonic()]

        def progress(t: TickStats) -> None:
            if as_json or time.monotonic() - last[0] < 5:
                return
            last[0] = time.monotonic()
            total = sim.report.total
            ctr = f"{total.ctr:.4f}" if total.ctr is not None else "-"
            click.echo(f"tick {t.tick}: requests={total.requests} errors={total.errors} "
                       f"impressions={total.impressions} ctr={ctr}", err=True)

        with Simulator(config) as sim:
            try:
                report = sim.run(duration_s=duration, progress=progress)
            except KeyboardInterrupt:
                report = sim.report
    except (TesseraError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())
    if report.total.requests and report.total.errors == report.total.requests:
        raise click.ClickException(
            f"every feed request failed; first error: {report.error_samples[:1]}"
        )
