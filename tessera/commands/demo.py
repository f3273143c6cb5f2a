"""`tessera demo`: run the platform end to end on its embedded defaults, once."""

from __future__ import annotations

import time
from pathlib import Path

import click

from features.timeutil import DAY


@click.command("demo")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".tessera"), show_default=True,
              help="Directory for the broker state, the store and the warehouse.")
@click.option("--views", default=100_000, show_default=True, help="Views to generate.")
@click.option("--days", default=2, show_default=True, help="Days of history to generate.")
@click.option("--features", "features_file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("features.yaml"), show_default=True)
@click.option("--keep-broker", is_flag=True, help="Leave the embedded broker running at the end.")
def demo(home: Path, views: int, days: int, features_file: Path, keep_broker: bool) -> None:
    """Start the broker, generate events, run the dataflows, and read features back.

    \\b
    1. start the embedded Kafka broker and create the topics
    2. generate a seeded world of views, impressions and engagements ending now
    3. run the blocks and sequences dataflows over it into an LMDB store
    4. pre-assemble the hot item features
    5. print the features of the most viewed item and of a user
    """
    from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
    from dataflows.runner import run_flow
    from dataflows.sequences import SequencesFlowConfig, build_sequences_flow
    from features.client import FeatureClient
    from features.preassembled import refresh_preassembled
    from features.spec_loader import load_features
    from features.store import open_store
    from features.timeutil import to_iso
    from tessera.broker import EmbeddedBroker
    from tessera.synth import WorldConfig, write_to_kafka
    from tessera.topics import PLATFORM_TOPICS, create_topics

    fs = load_features(features_file)
    home.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(state_dir=home / "broker")
    info = broker.status()
    started = info is None
    if started:
        info = broker.start()
    click.echo(f"[1/5] broker at {info.bootstrap}")
    try:
        create_topics(info.bootstrap, PLATFORM_TOPICS, partitions=4)
        now = int(time.time() * 1000)
        start = now - days * DAY
        world = WorldConfig(seed=7, n_users=5_000, n_items=20_000, total_views=views,
                            start_ts=start, duration_ms=days * DAY,
                            id_namespace=f"demo{now}-")
        t0 = time.time()
        summary = write_to_kafka(world, info.bootstrap, batch_events=1_000)
        total = sum(summary.counts.values())
        click.echo(f"[2/5] generated {total:,} events in {time.time() - t0:.1f}s")

        store_url = f"lmdb://{home.resolve()}/store"
        t0 = time.time()
        run_flow(build_blocks_flow(BlocksFlowConfig(
            bootstrap=info.bootstrap, store_url=store_url, features=fs, bounded=True,
            warehouse=home / "warehouse")))
        run_flow(build_sequences_flow(SequencesFlowConfig(
            bootstrap=info.bootstrap, store_url=store_url, bounded=True)))
        click.echo(f"[3/5] dataflows done in {time.time() - t0:.1f}s -> {store_url}")

        with open_store(store_url) as store:
            rep = refresh_preassembled(store, fs, "item")
            click.echo(f"[4/5] pre-assembled {rep.entities:,} items x {len(rep.columns)} values")
            client = FeatureClient(store, fs)
            items = list(store.list_entity_ids("item", "views"))
            probe = client.get_features("item", items, ["item_views_1d"])
            top = items[int(probe.values[:, 0].argmax())] if items else "none"
            res = client.get_features("item", [top], client.names_for("item"))
            click.echo(f"[5/5] features at watermark {to_iso(res.watermark)} "
                       f"(stale: {', '.join(res.stale) or 'none'})")
            click.echo(f"\nitem {top}")
            for name, value in res.row(0).items():
                click.echo(f"  {name:<26} {value:.6g}" if isinstance(value, float)
                           else f"  {name:<26} {value}")
            users = list(store.list_entity_ids("user", "views"))[:1]
            if users:
                ures = client.get_features("user", users, client.names_for("user"))
                click.echo(f"\nuser {users[0]}")
                for name, value in ures.row(0).items():
                    shown = f"{value:.6g}" if isinstance(value, float) else str(value)[:60]
                    click.echo(f"  {name:<26} {shown}")
                seq = client.get_sequences(users, max_len=5)
                click.echo(f"  recent actions: {list(zip(seq.actions[0], seq.item_ids[0]))}")
        click.echo("\nnext: `tessera features get --entity item --ids "
                   f"{top} --store {store_url}`")
    finally:
        if started and not keep_broker:
            broker.stop(timeout_s=5)
            click.echo("broker stopped")
