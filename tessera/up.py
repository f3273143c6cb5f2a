"""`tessera up`: the whole platform on one machine, as real processes.

Order of operations (each step is a real component, started the way a user would):

1. the embedded broker and the topics;
2. bootstrap history from the synthetic world, into Kafka (ending now);
3. workers, each its own process: blocks, sequences, raw archive, label join, pre-assembly;
4. once the workers have caught up: batch blocks over the history, backfill of the training
   examples, and an initial training of L1, L2 and retrieval, published to the registry;
5. the serving endpoint (it hot-reloads published models);
6. the closed-loop simulator (HTTP client traffic; views to Kafka; engagements via the API);
7. a retraining loop: every ``retrain_every_s``, backfill the new range, train, evaluate, and
   publish when the new L2 beats the serving one (AUC on the later slice).

Every child runs in its own process group; ``pids.json`` under ``home/up`` lets ``tessera
down`` (or Ctrl-C) stop them all. Logs go to ``home/up/logs/<name>.log``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from features.timeutil import DAY, MINUTE, parse_duration, to_iso
from tessera.logs import get_logger

log = get_logger("tessera.up")


class ChildFailed(RuntimeError):
    """A process ``tessera up`` started exited with an error: its name, code, log and the
    last line it wrote (usually the error)."""

    def __init__(self, name: str, code: int, log_path: Path):
        self.name, self.code, self.log_path = name, code, log_path
        try:
            lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
        except OSError:
            lines = []
        self.last_line = next((ln for ln in reversed(lines) if ln), "")
        super().__init__(f"{name} exited with {code}: {self.last_line or '(no output)'} "
                         f"(log {log_path})")


def check_inputs(features_file: Path = Path("features.yaml")) -> None:
    """Raise ``ValueError`` (one line) unless the platform's feature definitions are here:
    ``tessera up`` runs the demo world, whose workers, backfill and models read them."""
    from features.errors import TesseraError
    from features.spec_loader import load_features

    if not features_file.exists():
        raise ValueError(
            f"tessera up runs the platform's demo world and reads {features_file} from the "
            "current directory (the repository's, with the views/engagements features); "
            "run it from the repository checkout, or copy that file here. For your own "
            "events see `tessera init`.")
    try:
        fs = load_features(features_file)
    except TesseraError as exc:
        raise ValueError(str(exc)) from None
    names = {f.name for f in fs.features} | {d.name for d in fs.derived} | {
        w for f in fs.features for w in f.window_names()}
    missing = [n for n in BACKFILL_FEATURES if n not in names]
    if missing:
        raise ValueError(
            f"{features_file} lacks the features tessera up's models are trained on: "
            f"{', '.join(missing)}; run it with the repository's features.yaml")


@dataclass(frozen=True, kw_only=True)
class UpConfig:
    """Sizes and places of one ``tessera up``."""

    home: Path = Path(".tessera")
    port: int = 8000
    bootstrap: str | None = None  # None: start the embedded broker
    store_url: str | None = None  # None: lmdb under home
    warehouse: Path | None = None
    history_days: float = 2.0
    history_views: int = 150_000
    users: int = 2_000
    items: int = 10_000
    label_window: str = "5m"
    retrain_every_s: float = 180.0
    max_retrains: int | None = None
    sim_rate: float = 10.0
    popularity_share: float = 0.5
    epochs: int = 2
    seed: int = 7
    #: how often the served impressions are checked against the offline recomputation
    consistency_every_s: float = 60.0
    #: where the offline jobs (batch blocks, backfill, the training-data scan, consistency)
    #: run: ``local`` or ``ray`` (a local Ray cluster per job, or ``ray_address``'s)
    offline_engine: str = "local"
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.offline_engine not in ("local", "ray"):
            raise ValueError(f"offline_engine must be 'local' or 'ray', got "
                             f"{self.offline_engine!r}")
        if self.ray_address and self.offline_engine != "ray":
            raise ValueError("ray_address needs offline_engine='ray'")

    def engine_args(self) -> list[str]:
        """The ``--engine`` options every offline job of the platform gets."""
        if self.offline_engine == "local":
            return []
        return ["--engine", "ray", *(["--ray-address", self.ray_address]
                                     if self.ray_address else [])]

    @property
    def state_dir(self) -> Path:
        return self.home / "up"

    @property
    def store(self) -> str:
        return self.store_url or f"lmdb://{(self.home / 'store').resolve()}"

    @property
    def wh(self) -> Path:
        return self.warehouse or self.home / "warehouse"

    @property
    def registry(self) -> Path:
        return self.home / "registry"


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    oneshot: bool = False  # a periodic job: its exit is not a failure of the platform


@dataclass
class Platform:
    """The running platform: children, the broker, and the retraining state."""

    config: UpConfig
    say: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)
    broker: object | None = None
    bootstrap: str = ""
    retrains: int = 0
    published: list[str] = field(default_factory=list)
    serving_since_ms: int | None = None
    checking: Child | None = None  # the running consistency check
    #: messages written per topic by ``bootstrap_history`` (the archive must hold them all)
    history_messages: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ processes
    def _tessera(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", *args]

    def spawn(self, name: str, args: list[str], oneshot: bool = False) -> Child:
        logs = self.config.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{name}.log"
        out = path.open("ab")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd())
        child = Child(name, proc, path, oneshot)
        self.children.append(child)
        self._write_pids()
        return child

    def run_step(self, name: str, args: list[str], timeout_s: float = 1800) -> None:
        """Run a one-shot command to completion (its output in the logs)."""
        child = self.spawn(name, args)
        try:
            code = child.proc.wait(timeout=timeout_s)
        finally:
            self.children.remove(child)
            self._write_pids()
        if code != 0:
            raise ChildFailed(name, code, child.log_path)

    def _write_pids(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        data = {"pids": {c.name: c.proc.pid for c in self.children},
                "broker_state": str(self.config.home / "broker"),
                "owns_broker": self.config.bootstrap is None,
                "url": f"http://127.0.0.1:{self.config.port}"}
        tmp = self.config.state_dir / "pids.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.config.state_dir / "pids.json")

    def check_children(self) -> None:
        """Raise if a long-running child died."""
        for c in self.children:
            if c.oneshot:
                continue
            code = c.proc.poll()
            if code is not None:
                raise ChildFailed(c.name, code, c.log_path)

    # ------------------------------------------------------------------ steps
    def start_broker(self) -> None:
        from tessera.broker import EmbeddedBroker
        from tessera.topics import PLATFORM_TOPICS, create_topics

        if self.config.bootstrap:
            self.bootstrap = self.config.bootstrap
        else:
            broker = EmbeddedBroker(state_dir=self.config.home / "broker")
            info = broker.status() or broker.start()
            self.broker, self.bootstrap = broker, info.bootstrap
        create_topics(self.bootstrap, PLATFORM_TOPICS, partitions=4)
        self.say(f"broker     {self.bootstrap}")

    def bootstrap_history(self) -> int:
        from tessera.synth import WorldConfig, write_to_kafka

        c = self.config
        now = int(time.time() * 1000)
        self.world = WorldConfig(seed=c.seed, n_users=c.users, n_items=c.items,
                                 n_authors=max(10, c.items // 20), n_topics=16,
                                 total_views=c.history_views,
                                 start_ts=now - int(c.history_days * DAY),
                                 duration_ms=int(c.history_days * DAY) - 2 * MINUTE,
                                 id_namespace=f"h{now}-")
        summary = write_to_kafka(self.world, self.bootstrap, batch_events=1_000)
        self.history_messages = dict(summary.messages)
        total = sum(summary.counts.values())
        (c.state_dir).mkdir(parents=True, exist_ok=True)
        (c.state_dir / "simulator_args.json").write_text(json.dumps(self.simulator_args()))
        self.say(f"history    {total:,} events over {c.history_days:g} days")
        return now

    def start_workers(self) -> None:
        c, b = self.config, self.bootstrap
        rec = c.home / "recovery"
        self.spawn("blocks", self._tessera("worker", "blocks", "--bootstrap", b, "--store", c.store,
                                           "--recovery-dir", str(rec / "blocks"),
                                           "--warehouse", str(c.wh), "--flush-interval", "1s"))
        self.spawn("sequences", self._tessera("worker", "sequences", "--bootstrap", b,
                                              "--store", c.store,
                                              "--recovery-dir", str(rec / "sequences")))
        self.spawn("archive", self._tessera("worker", "archive", "--bootstrap", b,
                                            "--warehouse", str(c.wh), "--commit-interval", "5s"))
        self.spawn("labels", self._tessera("worker", "labels", "--bootstrap", b,
                                           "--warehouse", str(c.wh),
                                           "--label-window", c.label_window))
        self.say("workers    blocks, sequences, archive, labels")

    def wait_caught_up(self, until_ts: int, timeout_s: float = 900, idle_s: float = 15) -> int:
        """Wait until the blocks worker has read the history; return its watermark.

        Caught up means every shard's watermark passed ``until_ts``, or the watermarks have
        not moved for ``idle_s`` (a partition with no recent events holds the minimum back,
        but then the worker is idle: everything there is was read).
        """
        deadline = time.monotonic() + timeout_s
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            self.check_children()
            marks = self._blocks_watermarks()
            if marks:
                snapshot = tuple(sorted(marks.items()))
                if snapshot != last:
                    last, since = snapshot, time.monotonic()
                low = min(marks.values())
                if low >= until_ts or time.monotonic() - since >= idle_s:
                    self.say(f"caught up  blocks watermark {to_iso(low)}")
                    return low
            time.sleep(1.0)
        raise TimeoutError("the workers did not catch up with the history in time")

    def _blocks_watermarks(self) -> dict[str, int]:
        """The blocks worker's watermark per shard ({} when the store cannot be read yet)."""
        from features.store import open_store

        try:
            with open_store(self.config.store, readonly=True) as store:
                return store.get_watermarks("blocks/")
        except Exception:
            return {}

    def wait_archived(self, timeout_s: float = 300) -> None:
        """Wait until the raw archive has committed every history message.

        The first training reads the history from the archive's Iceberg tables, and the
        archive commits every few seconds on its own schedule: a blocks worker that catches
        up first (as it does on a fast store) would otherwise leave the batch step reading an
        empty or partial archive. A topic's committed offsets add up to its message count
        once all of it is in (a fresh broker starts every partition at 0).
        """
        from dataflows.archive import committed_start_offsets

        want = {t: n for t, n in self.history_messages.items() if n}
        deadline = time.monotonic() + timeout_s
        behind = want
        while time.monotonic() < deadline:
            self.check_children()
            try:
                done = committed_start_offsets(self.config.wh, tuple(want))
            except Exception:  # the tables are not created yet
                done = {}
            behind = {t: n - sum(done.get(t, {}).values()) for t, n in want.items()
                      if sum(done.get(t, {}).values()) < n}
            if not behind:
                self.say("archived   the history is in the raw tables")
                return
            time.sleep(1.0)
        raise TimeoutError(f"the archive did not commit the history in {timeout_s:g}s "
                           f"(messages still missing per topic: {behind})")

    def start_preassemble(self) -> None:
        self.spawn("preassemble", self._tessera("worker", "preassemble", "--store",
                                                self.config.store, "--interval", "10s",
                                                "--entity", "item", "--entity", "author"))

    def train_all(self, from_ts: int, to_ts: int) -> dict[str, str]:
        """Batch blocks + backfill over the range, then train and publish L1, L2, retrieval."""
        c = self.config
        wh = str(c.wh)
        f, t = str(from_ts), str(to_ts)
        self.run_step("batch", self._tessera("batch", "blocks", "--from", f, "--to", t,
                                             "--warehouse", wh, "--store", c.store,
                                             *c.engine_args()))
        version = f"bf-{to_ts}"
        self.run_step("backfill", self._tessera(
            "backfill", "--features", ",".join(BACKFILL_FEATURES), "--from", f, "--to", t,
            "--warehouse", wh, "--version", version, *c.engine_args()))
        for kind in ("l1", "l2", "retrieval"):
            self.run_step(f"train-{kind}", self._tessera(
                "train", kind, "--from", f, "--to", t, "--warehouse", wh, "--version", version,
                "--registry", str(c.registry), "--epochs", str(c.epochs), "--seed", str(c.seed),
                *c.engine_args()))
        from models.registry import ModelRegistry

        reg = ModelRegistry(c.registry)
        current = {k: (reg.current(k).version if reg.current(k) else "") for k in
                   ("l1", "l2", "retrieval")}
        self.published.append(current.get("l2", ""))
        return current

    def start_serving(self) -> None:
        c = self.config
        self.spawn("serve", self._tessera("serve", "--port", str(c.port), "--store", c.store,
                                          "--registry", str(c.registry), "--bootstrap",
                                          self.bootstrap, "--spool", str(c.home / "spool")))
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.check_children()
            try:
                if httpx.get(f"http://127.0.0.1:{c.port}/readyz", timeout=1).status_code == 200:
                    self.say(f"serving    http://127.0.0.1:{c.port}  (dashboard: /dashboard)")
                    self.serving_since_ms = int(time.time() * 1000)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the serving endpoint did not become ready")

    def start_simulator(self) -> None:
        c = self.config
        self.spawn("simulate", self._tessera("simulate", *self.simulator_args(),
                                             "--duration", "100000h"))
        self.say(f"simulator  {c.sim_rate:g} feed requests/s, {c.popularity_share:.0%} of users "
                 "on the popularity baseline")

    def simulator_args(self) -> list[str]:
        """``tessera simulate`` options that rebuild exactly the bootstrap world."""
        c, w = self.config, self.world
        return ["--url", f"http://127.0.0.1:{c.port}", "--bootstrap", self.bootstrap,
                "--users", str(w.n_users), "--items", str(w.n_items),
                "--authors", str(w.n_authors), "--topics", str(w.n_topics),
                "--seed", str(w.seed), "--world-start", str(w.start_ts),
                "--world-days", f"{w.duration_ms / DAY:.9f}",
                "--rate", str(c.sim_rate), "--popularity-share", str(c.popularity_share)]

    # ------------------------------------------------------------------ lifecycle
    def up(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Start everything, then retrain on a schedule until ``stop()`` or max_retrains."""
        c = self.config
        self.start_broker()
        history_end = self.bootstrap_history()
        self.start_workers()
        caught = self.wait_caught_up(history_end - 2 * MINUTE - 60_000)
        self.wait_archived()
        self.start_preassemble()
        t0 = history_end - int(c.history_days * DAY)
        train_end = caught - caught % (5 * MINUTE)
        versions = self.train_all(t0, train_end)
        self.say(f"models     {versions}")
        self.start_serving()
        self.start_simulator()
        last_train_end = train_end
        next_retrain = time.monotonic() + c.retrain_every_s
        next_check = time.monotonic() + c.consistency_every_s
        while not stop():
            self.check_children()
            if time.monotonic() >= next_check and self.check_consistency():
                next_check = time.monotonic() + c.consistency_every_s
            if time.monotonic() >= next_retrain:
                now = int(time.time() * 1000)
                end = now - now % (5 * MINUTE) - parse_duration(c.label_window) - 5 * MINUTE
                marks = self._blocks_watermarks()
                if end > last_train_end and marks and min(marks.values()) < end:
                    # the batch correction covers only blocks the live flow has sealed
                    next_retrain = time.monotonic() + 5
                    continue
                if end > last_train_end:
                    versions = self.train_all(t0, end)
                    last_train_end = end
                    self.retrains += 1
                    self.say(f"retrained  #{self.retrains}: {versions}")
                next_retrain = time.monotonic() + c.retrain_every_s
                if c.max_retrains is not None and self.retrains >= c.max_retrains:
                    self.say("retrain limit reached; platform keeps running")
                    next_retrain = float("inf")
            time.sleep(0.5)

    def check_consistency(self) -> bool:
        """Start ``tessera consistency`` over the impressions served so far, unless one runs.

        The report (JSON) replaces ``home/consistency.json``, which the dashboard shows. The
        last minute is left out: its impressions and sealed blocks may not be archived yet.
        Returns whether a check was started.
        """
        c = self.config
        if self.checking is not None:
            code = self.checking.proc.poll()
            if code is None:
                return False
            self.children.remove(self.checking)
            self._write_pids()
            if code != 0:
                tail = self.checking.log_path.read_text(errors="replace")[-500:]
                self.say(f"consistency check failed (exit {code}): {tail.strip()}")
            self.checking = None
        to_ms = int(time.time() * 1000) - MINUTE
        if self.serving_since_ms is None or to_ms <= self.serving_since_ms:
            return False
        self.checking = self.spawn("consistency", self._tessera(
            "consistency", "--from", str(self.serving_since_ms), "--to", str(to_ms),
            "--warehouse", str(c.wh), "--sample", "5000", "--json",
            "--output", str(c.home / "consistency.json"),
            "--png", str(c.home / "consistency.png"), *c.engine_args()), oneshot=True)
        return True

    def down(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL) and the embedded broker."""
        stop_children([c.proc.pid for c in self.children])
        self.children.clear()
        if self.broker is not None:
            self.broker.stop(timeout_s=5)
        self._write_pids()


BACKFILL_FEATURES = (
    "item_views", "item_impressions", "item_clicks", "item_likes", "item_hides",
    "item_dwell_mean", "item_unique_viewers", "user_views", "user_clicks", "user_recent_items",
    "user_recent_topics", "user_long_view_topics", "user_engaged_topics",
    "user_topics_distinct", "author_views", "item_ctr_1d", "item_ctr_7d",
)


def stop_children(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGTERM each process group, wait, then SIGKILL what is left."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def down_from_state(home: Path) -> list[str]:
    """``tessera down``: stop what a ``tessera up`` under ``home`` started."""
    state = home / "up" / "pids.json"
    if not state.exists():
        return []
    data = json.loads(state.read_text())
    stop_children(list(data["pids"].values()))
    stopped = list(data["pids"])
    if data.get("owns_broker"):
        from tessera.broker import EmbeddedBroker

        if EmbeddedBroker(state_dir=Path(data["broker_state"])).stop(timeout_s=5):
            stopped.append("broker")
    state.unlink(missing_ok=True)
    return stopped

