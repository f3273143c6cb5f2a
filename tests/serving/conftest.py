"""A real serving stack for the serving tests: broker, flows, store, HTTP server."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.runner import run_flow
from dataflows.sequences import SequencesFlowConfig, build_sequences_flow
from features.preassembled import refresh_preassembled
from features.spec_loader import load_features
from features.store import open_store
from serving.app import create_app
from serving.config import ServingConfig
from tessera.broker import EmbeddedBroker, find_free_port
from tessera.synth import WorldConfig, write_to_kafka
from tessera.topics import PLATFORM_TOPICS, create_topics


@dataclass
class Stack:
    bootstrap: str
    base_url: str
    store_url: str
    tmp: Path
    server: uvicorn.Server
    broker: EmbeddedBroker
    world: WorldConfig


def start_server(config: ServingConfig) -> uvicorn.Server:
    """Run the app with uvicorn in a thread; return once /readyz answers 200."""
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=config.host,
                                           port=config.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{config.host}:{config.port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    tmp = tmp_path_factory.mktemp("serving")
    broker = EmbeddedBroker(state_dir=tmp / "broker")
    bootstrap = broker.start().bootstrap
    create_topics(bootstrap, PLATFORM_TOPICS, partitions=2)
    # the world ends 15 minutes ago: its engagements trail their views by up to a minute
    # or so, and a family watermark ahead of the clock by more than a block makes the
    # default read (at = now) a refused historical read, depending on the clock's phase
    now = int(time.time() * 1000) - 15 * 60_000
    world = WorldConfig(seed=3, n_users=200, n_items=1_500, n_authors=60, n_topics=8,
                        total_views=6_000, start_ts=now - 86_400_000, duration_ms=86_400_000,
                        id_namespace="t-")
    write_to_kafka(world, bootstrap, batch_events=500)
    features = load_features("features.yaml")
    store_url = f"lmdb://{tmp}/store"
    run_flow(build_blocks_flow(BlocksFlowConfig(bootstrap=bootstrap, store_url=store_url,
                                                features=features, bounded=True)))
    run_flow(build_sequences_flow(SequencesFlowConfig(bootstrap=bootstrap, store_url=store_url,
                                                      bounded=True)))
    with open_store(store_url) as store:
        refresh_preassembled(store, features, "item")
    port = find_free_port()
    config = ServingConfig(port=port, store_url=store_url, bootstrap=bootstrap,
                           spool_dir=tmp / "spool", registry_dir=tmp / "registry")
    server = start_server(config)
    yield Stack(bootstrap, f"http://127.0.0.1:{port}", store_url, tmp, server, broker, world)
    server.should_exit = True
    time.sleep(0.5)
    broker.stop(timeout_s=1)
