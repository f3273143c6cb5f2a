"""`tessera up` and `tessera down`: the whole platform with one command."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click


@click.command("up")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".tessera"), show_default=True,
              help="State directory: broker, store, warehouse, registry, logs.")
@click.option("--port", default=8000, show_default=True, help="Serving port (127.0.0.1).")
@click.option("--bootstrap", default=None, help="Use this Kafka instead of the embedded broker.")
@click.option("--store", "store_url", default=None,
              help="Online store URL (default: LMDB under --home; aerospike://host:3000/ns).")
@click.option("--warehouse", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Iceberg warehouse (default: under --home).")
@click.option("--short", is_flag=True,
              help="A small world and a fast retraining loop (demos, the end-to-end test).")
@click.option("--retrain-every", default=None, type=float,
              help="Seconds between retrainings (default 180; 60 with --short).")
@click.option("--max-retrains", default=None, type=int, help="Stop retraining after N rounds.")
@click.option("--popularity-share", default=0.5, show_default=True,
              help="Share of simulated users ranked by the popularity baseline.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="Where the offline jobs run (batch blocks, backfill, the training-data "
                   "scan, consistency): in their own process, or on Ray (pip install -e "
                   "'.[ray]'; a local cluster per job unless --ray-address).")
@click.option("--ray-address", default=None,
              help="With --engine ray: an existing cluster for every offline job.")
def up(home: Path, port: int, bootstrap: str | None, store_url: str | None,
       warehouse: Path | None, short: bool, retrain_every: float | None,
       max_retrains: int | None, popularity_share: float, engine: str,
       ray_address: str | None) -> None:
    """Run the whole platform: broker, workers, training, serving, simulator, retraining.

    Prints the URLs as they come up. Ctrl-C (or `tessera down` from another shell) stops
    every process it started. Logs: <home>/up/logs/.
    """
    from tessera.up import ChildFailed, Platform, UpConfig, check_inputs

    try:
        check_inputs()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None

    sizes = {"history_days": 1.0, "history_views": 40_000, "users": 500, "items": 3_000,
             "label_window": "2m", "epochs": 2} if short else {}
    try:
        config = UpConfig(home=home, port=port, bootstrap=bootstrap, store_url=store_url,
                          warehouse=warehouse, popularity_share=popularity_share,
                          retrain_every_s=retrain_every or (60.0 if short else 180.0),
                          max_retrains=max_retrains, offline_engine=engine,
                          ray_address=ray_address, **sizes)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    platform = Platform(config, say=lambda m: click.echo(m, err=True))
    failed: ChildFailed | None = None
    try:
        platform.up(stop=stop.is_set)
    except KeyboardInterrupt:
        click.echo("\nstopping ...", err=True)
    except ChildFailed as exc:
        failed = exc
    finally:
        platform.down()
        click.echo("stopped", err=True)
    if failed is not None:
        raise click.ClickException(str(failed))


@click.command("down")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".tessera"), show_default=True)
def down(home: Path) -> None:
    """Stop every process a `tessera up` under --home started."""
    from tessera.up import down_from_state

    stopped = down_from_state(home)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")
