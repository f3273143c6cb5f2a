"""`tessera serve`: the HTTP serving endpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from models.devices import DEVICES
from tessera.home import STORE_DEFAULT_TEXT, default_store_url


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address (127.0.0.1: local only; 0.0.0.0 to expose it).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Serving processes on the port (each with its own ONNX sessions and "
                   "caches, sharing the store read-only).")
@click.option("--store", "store_url", default=default_store_url, show_default=STORE_DEFAULT_TEXT)
@click.option("--features", "features_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("features.yaml"), show_default=True)
@click.option("--registry", "registry_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".tessera/registry"), show_default=True)
@click.option("--bootstrap", default=None,
              help="Kafka for impressions, engagements and the item catalog (default: the "
                   "running embedded broker).")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".tessera/spool"), show_default=True,
              help="Where impressions wait while Kafka is unreachable.")
@click.option("--max-in-flight", default=32, show_default=True, type=int,
              help="Feed requests admitted at once per process (computing or waiting for a "
              "feed thread); beyond it: 503 + Retry-After.")
@click.option("--feed-threads", default=None, type=int,
              help="Feed requests computed at once per process (default: CPU count, >= 2).")
@click.option("--device", type=click.Choice(DEVICES), default="auto",
              show_default=True,
              help="Where the models run: auto takes CUDA when ONNX Runtime offers it; cuda "
              "refuses to start without it.")
@click.option("--api-key", "api_keys", multiple=True,
              help="KEY:ROLE (read, write, admin); repeat. None: no authentication.")
def serve(host: str, port: int, workers: int, store_url: str, features_path: Path,
          registry_dir: Path, bootstrap: str | None, spool_dir: Path, max_in_flight: int,
          feed_threads: int | None, device: str, api_keys: tuple[str, ...]) -> None:
    """Serve ranked feeds over HTTP (JSON; OpenAPI schema at /openapi.json).

    \\b
    POST /v1/feed       {"user_id", "feed_type", "limit"} -> ranked items
    POST /v1/events     engagements -> Kafka
    GET  /v1/features   ?entity=item&ids=i1,i2&names=...
    GET  /healthz, /readyz, /metrics
    """
    import uvicorn

    from tessera.broker import resolve_bootstrap
    from tessera.errors import BootstrapNotConfiguredError

    if bootstrap is None:
        try:
            bootstrap = resolve_bootstrap(None)
        except BootstrapNotConfiguredError:
            click.echo("no Kafka found: impressions go to the spool, /v1/events is off", err=True)
    keys = {}
    for item in api_keys:
        key, _, role = item.partition(":")
        keys[key] = role or "read"
    config = {"host": host, "port": port, "store_url": store_url,
              "features_path": str(features_path), "registry_dir": str(registry_dir),
              "bootstrap": bootstrap, "spool_dir": str(spool_dir),
              "max_in_flight": max_in_flight, "api_keys": keys, "device": device}
    if feed_threads is not None:
        config["feed_threads"] = feed_threads
    from serving.config import ServingConfig

    try:
        ServingConfig(**{**config, "features_path": features_path,
                         "registry_dir": registry_dir, "spool_dir": spool_dir})
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    os.environ["TESSERA_SERVE_CONFIG"] = json.dumps(config)
    click.echo(f"serving on http://{host}:{port} ({workers} worker(s))", err=True)
    uvicorn.run("serving.app:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level="warning", access_log=False)
