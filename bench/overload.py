"""Benchmark: the serving endpoint driven past its capacity (load shedding and recovery).

One run, one machine (the load generator, the server and the broker share the cores):

1. A seeded world goes to the embedded broker; the real blocks and sequences flows (bounded)
   fill an LMDB store; the pre-assembly job writes the hot item values.
2. ``uvicorn serving.app:app_from_env`` in its own process, as ``tessera serve`` runs it: the
   real store, feature client, candidate generators, forward log to Kafka and the popularity
   ranker (no models are published: the fastest realistic ranker to stand up;
   ``bench/serving.py`` measures the ONNX rankers). ``--candidates`` candidates a request.
3. A load generator in its own process (asyncio on raw keep-alive sockets, uvloop) measures
   the **capacity** closed-loop: 1, 2, 4... concurrent clients, each sending its next request
   when the last one answers; capacity is the highest throughput whose p99 stays under
   ``--slo-ms``.
4. Then, for the server's default ``max_in_flight`` and for one sized from the capacity
   (2 x the clients at capacity), a fresh server is driven open-loop at fixed rates (latency
   counted from each request's *scheduled* send time, so a slow server cannot slow the
   generator down and hide its own queueing), back to back: ``1x`` capacity (the baseline of
   the same run), ``--overload`` x capacity, then ``0.5x`` (recovery), ``--phase-s`` s each.

Per phase: offered and admitted rate, admitted (200) p50/p99, 503 count and p99, other
failures, and the server's RSS (``/proc/<pid>/status`` VmRSS every second: start, max, end).
After the drop: the 1-second-window p99s and how long until one is back under the SLO (or
the 1x p99, if larger). Ratios compare the overload phase with the 1x phase of the same run.

Soak (``--soak MINUTES``, issue 19): after the capacity measurement, one server with its
default settings runs MINUTES of open-loop load at 0.7 x the capacity, every fifth minute at
``--overload`` x (so the shedding path runs too); the RSS of the server and its background
child is sampled every 5 s and reported per minute with the minute's 200 p99 and failures.
Its last line is ``RESULT soak minutes=... rss_min1_mb=... rss_end_mb=...
rss_growth_after_min5_mb=... rss_slope_mb_per_10min=... p99_first_ms=... p99_last_ms=...``.

Usage: python bench/overload.py [--quick] [--max-in-flight N] [--phase-s S] [--overload X]
       [--soak MINUTES]
Last line: RESULT overload capacity_rps=<c> ... default_p99_ratio=<overload admitted p99 /
1x p99> ... sized_... (the same for the sized max_in_flight)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)  # bench/models.py would shadow the models package


# ---------------------------------------------------------------------------- the stack

def build_store(tmp: Path, bootstrap: str, *, n_items: int, views: int, n_users: int,
                seed: int = 11) -> tuple[str, list[str]]:
    """World -> broker -> bounded blocks + sequences flows -> LMDB; pre-assemble items.

    Returns the store URL and the ids of users that have data.
    """
    from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
    from dataflows.runner import run_flow
    from dataflows.sequences import SequencesFlowConfig, build_sequences_flow
    from features.preassembled import refresh_preassembled
    from features.spec_loader import load_features
    from features.store import open_store
    from tessera.synth import WorldConfig, write_to_kafka

    fs = load_features(REPO / "features.yaml")
    url = f"lmdb://{tmp}/store"
    # the world ends 3 days ago: no feature watermark may be ahead of the wall clock
    now = int(time.time() * 1000) // 60_000 * 60_000 - 3 * 86_400_000
    world = WorldConfig(seed=seed, n_users=n_users, n_items=n_items,
                        n_authors=max(50, n_items // 20), total_views=views,
                        start_ts=now - 2 * 86_400_000, duration_ms=2 * 86_400_000,
                        zipf_exponent=0.8, preexisting_item_fraction=1.0, late_fraction=0.0)
    write_to_kafka(world, bootstrap, batch_events=1000)
    run_flow(build_blocks_flow(BlocksFlowConfig(bootstrap=bootstrap, store_url=url, features=fs,
                                                bounded=True)))
    run_flow(build_sequences_flow(SequencesFlowConfig(bootstrap=bootstrap, store_url=url,
                                                      bounded=True)))
    with open_store(url) as store:
        refresh_preassembled(store, fs, "item")
        refresh_preassembled(store, fs, "author")
        users = [str(u) for u in store.list_entity_ids("user", "views")]
    return url, users


def start_server(tmp: Path, store_url: str, bootstrap: str, *, max_in_flight: int | None,
                 candidates: int, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``uvicorn serving.app:app_from_env`` in its own process; return it once /readyz is 200."""
    import httpx

    from tessera.broker import find_free_port

    port = port or find_free_port()
    cfg = {"host": "127.0.0.1", "port": port, "store_url": store_url,
           "features_path": str(REPO / "features.yaml"), "registry_dir": str(tmp / "registry"),
           "bootstrap": bootstrap, "spool_dir": str(tmp / f"spool-{port}"),
           "candidate_limits": {"ann": 0, "topics": 0, "fresh": 0, "trending": candidates}}
    if max_in_flight is not None:
        cfg["max_in_flight"] = max_in_flight
    log = open(tmp / f"server-{port}.log", "wb")  # kept open as long as the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "serving.app:app_from_env", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
         "--no-access-log"], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TESSERA_SERVE_CONFIG": json.dumps(cfg),
             "TESSERA_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: "
                               f"{(tmp / f'server-{port}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready in 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (VmRSS), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tree_rss_mb(pid: int) -> float | None:
    """RSS of ``pid`` plus its live children's (the serving process's background builder),
    in MiB; None once ``pid`` is gone."""
    own = rss_mb(pid)
    if own is None:
        return None
    total = own
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            total += rss_mb(int(entry)) or 0.0
    return total


class RssSampler:
    """Samples a process's RSS every ``interval_s`` on a thread: ``samples`` = [(time, MiB)]
    (``tree``: the process and its children together)."""

    def __init__(self, pid: int, interval_s: float = 1.0, tree: bool = False):
        self.pid, self.interval, self.tree = pid, interval_s, tree
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            v = tree_rss_mb(self.pid) if self.tree else rss_mb(self.pid)
            if v is not None:
                self.samples.append((time.time(), v))
            if self._stop.wait(self.interval):
                return

    def between(self, t0: float, t1: float) -> list[float]:
        """The samples in [t0, t1], plus the last one before t0 (the level at the start)."""
        before = [v for t, v in self.samples if t < t0][-1:]
        return before + [v for t, v in self.samples if t0 <= t <= t1]


def scrape(base: str, metric: str) -> float:
    """Sum of a Prometheus metric's samples on the server (0 when absent)."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    vals = re.findall(rf"^{metric}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return sum(float(v) for v in vals)


# ---------------------------------------------------------------------------- load generator
#
# Runs as its own process (``python bench/overload.py --loadgen``): a JSON command on stdin,
# the per-request results as JSON in the file the command names (``out``). One record per
# request: [scheduled send (s, loop clock from the phase start), latency ms, status (0 =
# connection error or timeout), 1 if a 503 carried Retry-After, the generator's own send lag
# ms].

class _Pool:
    """Keep-alive HTTP/1.1 connections to one server; a new one when none is idle.

    A connection idle for more than ``max_idle_s`` is closed instead of reused: uvicorn closes
    idle keep-alive connections after 5 s, and a request written into one it is closing would
    count as a failure of the server.
    """

    def __init__(self, host: str, port: int, max_idle_s: float = 3.0):
        self.host, self.port, self.max_idle_s = host, port, max_idle_s
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def get(self):
        now = time.monotonic()
        while self.idle:
            since, reader, writer = self.idle.pop()
            if now - since <= self.max_idle_s and not reader.at_eof():
                return reader, writer
            writer.close()
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    def put(self, conn) -> None:
        self.idle.append((time.monotonic(), *conn))

    def close(self) -> None:
        for _, _, w in self.idle:
            w.close()
        self.idle.clear()


async def _exchange(pool: _Pool, request: bytes, timeout_s: float) -> tuple[int, bool]:
    """Send one request; return (status, has Retry-After). Raises on connection trouble."""
    conn = await pool.get()
    reader, writer = conn
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close, retry_after = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "retry-after" and value.strip():
                retry_after = True
        if length:
            await asyncio.wait_for(reader.readexactly(length), timeout_s)
    except BaseException:
        writer.close()
        raise
    if close:
        writer.close()
    else:
        pool.put(conn)
    return status, retry_after


def _requests(users: list[str], seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for u in rng.choice(users, n):
        body = json.dumps({"user_id": str(u), "feed_type": "EXPLORE", "limit": 20}).encode()
        out.append(b"POST /v1/feed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/json\r\nContent-Length: "
                   + str(len(body)).encode() + b"\r\n\r\n" + body)
    return out


async def _open_loop(pool: _Pool, phases: list[dict], users: list[str], timeout_s: float,
                     ) -> list[dict]:
    """Each phase: ``rate`` requests/s for ``duration_s``, back to back, no pause between."""
    loop = asyncio.get_running_loop()
    out: list[dict] = []
    pending: set[asyncio.Task] = set()
    t_next = loop.time() + 0.05
    for k, ph in enumerate(phases):
        rate, duration = float(ph["rate"]), float(ph["duration_s"])
        n = max(1, int(rate * duration))
        reqs = _requests(users, 100 + k, min(n, 4096))
        records: list[list] = []
        t0 = t_next
        wall0 = time.time() + (t0 - loop.time())

        async def one(i: int, sched: float, records=records, reqs=reqs, t0=t0) -> None:
            lag = (loop.time() - sched) * 1000  # the generator's own delay in sending
            try:
                status, ra = await _exchange(pool, reqs[i % len(reqs)], timeout_s)
            except (TimeoutError, OSError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError):
                status, ra = 0, False
            records.append([sched - t0, (loop.time() - sched) * 1000, status, int(ra), lag])

        i = 0
        while i < n:
            now = loop.time()
            due = t0 + i / rate
            if due > now:
                await asyncio.sleep(due - now)
                now = loop.time()
            while i < n and t0 + i / rate <= now:  # everything due by now, at once
                task = asyncio.create_task(one(i, t0 + i / rate))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
        t_next = t0 + n / rate
        out.append({"name": ph["name"], "rate": rate, "duration_s": duration, "requests": n,
                    "wall_start": wall0, "wall_end": wall0 + n / rate, "records": records})
    if pending:
        await asyncio.wait(pending, timeout=timeout_s + 5)
    for ph in out:
        ph["wall_done"] = time.time()
    return out


async def _closed_loop(pool: _Pool, users: list[str], concurrency: int, duration_s: float,
                       timeout_s: float) -> dict:
    loop = asyncio.get_running_loop()
    reqs = _requests(users, concurrency, 2048)
    records: list[list] = []
    t0 = loop.time()
    stop = t0 + duration_s

    async def client(c: int) -> None:
        i = c
        while loop.time() < stop:
            start = loop.time()
            try:
                status, ra = await _exchange(pool, reqs[i % len(reqs)], timeout_s)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                status, ra = 0, False
            records.append([start - t0, (loop.time() - start) * 1000, status, int(ra), 0.0])
            i += concurrency

    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return {"concurrency": concurrency, "elapsed_s": loop.time() - t0, "records": records}


async def _loadgen_main(cmd: dict) -> dict:
    host, port = cmd["host"], int(cmd["port"])
    timeout_s = float(cmd.get("timeout_s", 30.0))
    users = cmd["users"]
    pool = _Pool(host, port)
    try:
        if cmd["mode"] == "closed":
            steps = []
            for c in cmd["concurrency"]:
                steps.append(await _closed_loop(pool, users, int(c), float(cmd["step_s"]),
                                                timeout_s))
                if cmd.get("stop_over_ms") and _p(steps[-1]["records"], 99, 200) \
                        >= cmd["stop_over_ms"] * 2:
                    break
            return {"steps": steps, "connections": pool.opened}
        phases = await _open_loop(pool, cmd["phases"], users, timeout_s)
        return {"phases": phases, "connections": pool.opened}
    finally:
        pool.close()


def loadgen_process() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cmd = json.loads(sys.stdin.read())
    res = asyncio.run(_loadgen_main(cmd))
    # to a file, not stdout: a pipe the busy parent drains late lost output past 128 KiB
    Path(cmd["out"]).write_text(json.dumps(res))


def drive(base: str, cmd: dict) -> dict:
    """Run the load generator process with ``cmd`` against ``base``; return its result."""
    host, port = base.removeprefix("http://").split(":")
    with tempfile.TemporaryDirectory(prefix="tessera-loadgen-") as d:
        out = Path(d) / "result.json"
        full = {**cmd, "host": host, "port": int(port), "out": str(out)}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--loadgen"],
                              input=json.dumps(full), capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the load generator failed (rc {proc.returncode}): "
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------- statistics

def _p(records: list[list], q: float, status: int | None = None) -> float:
    lat = [r[1] for r in records if status is None or r[2] == status]
    return float(np.percentile(lat, q)) if lat else float("nan")


@dataclass
class PhaseStats:
    name: str
    offered_rps: float
    requests: int
    admitted_rps: float
    ok: int
    shed: int
    shed_with_retry_after: int
    other: dict[str, int]
    ok_p50: float
    ok_p99: float
    shed_p99: float
    rss_start: float
    rss_max: float
    rss_end: float
    windows_p99: list[float] = field(default_factory=list)


def phase_stats(ph: dict, sampler: RssSampler | None) -> PhaseStats:
    recs = ph["records"]
    codes: dict[int, int] = {}
    for r in recs:
        codes[r[2]] = codes.get(r[2], 0) + 1
    ok, shed = codes.pop(200, 0), codes.pop(503, 0)
    other = {("conn_error" if c == 0 else str(c)): n for c, n in sorted(codes.items())}
    rss = sampler.between(ph["wall_start"], ph["wall_end"]) if sampler else []
    n_win = int(np.ceil(ph["duration_s"]))
    windows = []
    for w in range(n_win):  # p99 of 1-second windows by scheduled send time, all statuses
        lat = [r[1] for r in recs if w <= r[0] < w + 1]
        windows.append(float(np.percentile(lat, 99)) if lat else float("nan"))
    return PhaseStats(
        name=ph["name"], offered_rps=ph["rate"], requests=ph["requests"],
        admitted_rps=ok / ph["duration_s"], ok=ok, shed=shed,
        shed_with_retry_after=sum(1 for r in recs if r[2] == 503 and r[3]), other=other,
        ok_p50=_p(recs, 50, 200), ok_p99=_p(recs, 99, 200), shed_p99=_p(recs, 99, 503),
        rss_start=rss[0] if rss else float("nan"), rss_max=max(rss) if rss else float("nan"),
        rss_end=rss[-1] if rss else float("nan"), windows_p99=windows)


def recovery_s(stats: PhaseStats, bound_ms: float) -> float | None:
    """Seconds from the drop to the end of the first 1-s window whose p99 <= bound (None:
    none in the phase)."""
    for k, x in enumerate(stats.windows_p99):
        if x <= bound_ms:
            return float(k + 1)
    return None


def capacity_from(steps: list[dict], slo_ms: float) -> tuple[float, dict | None, list[dict]]:
    """Highest closed-loop throughput with p99 < SLO and no failures."""
    rows = []
    best, best_row = 0.0, None
    for s in steps:
        recs = s["records"]
        ok = sum(1 for r in recs if r[2] == 200)
        row = {"concurrency": s["concurrency"], "rps": ok / s["elapsed_s"],
               "p50": _p(recs, 50, 200), "p99": _p(recs, 99, 200),
               "failed": len(recs) - ok}
        rows.append(row)
        if row["p99"] < slo_ms and not row["failed"] and row["rps"] > best:
            best, best_row = row["rps"], row
    return best, best_row, rows


# ---------------------------------------------------------------------------- main

def _fmt(v: float, spec: str = ".1f") -> str:
    return "-" if v != v else format(v, spec)


@dataclass
class Capacity:
    rows: list[dict]
    rps: float  # the highest closed-loop throughput with p99 < SLO and nothing refused
    clients: int  # at this many concurrent clients


def measure_capacity(base: str, users: list[str], *, slo_ms: float, step_s: float,
                     max_clients: int) -> Capacity:
    """Closed loop, 1, 2, 4... clients: the highest throughput whose p99 stays under the SLO."""
    drive(base, {"mode": "closed", "users": users, "concurrency": [2], "step_s": 2.0})  # warm
    conc = [c for c in (1, 2, 4, 8, 16, 32) if c <= max_clients]
    closed = drive(base, {"mode": "closed", "users": users, "concurrency": conc,
                          "step_s": step_s, "stop_over_ms": slo_ms})
    best, best_row, rows = capacity_from(closed["steps"], slo_ms)
    if not best:  # a noisy machine: say so and go on with one client's throughput
        best_row = rows[0]
        best = best_row["rps"]
        print(f"warning: no closed-loop step met p99 < {slo_ms:g} ms; using one client's "
              f"{best:.1f} rps as the capacity", flush=True)
    return Capacity(rows, best, best_row["concurrency"])


def overload_run(tmp: Path, url: str, bootstrap: str, users: list[str], *, max_in_flight: int,
                 candidates: int, rate: float, overload: float, phase_s: float,
                 slo_ms: float) -> dict:
    """A fresh server; 1x, overload and 0.5x open-loop phases back to back; stats per phase."""
    server, base = start_server(tmp, url, bootstrap, max_in_flight=max_in_flight,
                                candidates=candidates)
    try:
        with RssSampler(server.pid) as sampler:
            drive(base, {"mode": "closed", "users": users, "concurrency": [2],
                         "step_s": 2.0})  # warm-up, not recorded
            phases = [{"name": "1x", "rate": rate, "duration_s": phase_s},
                      {"name": f"{overload:g}x", "rate": rate * overload, "duration_s": phase_s},
                      {"name": "0.5x", "rate": rate * 0.5, "duration_s": phase_s}]
            opened = drive(base, {"mode": "open", "users": users, "phases": phases})
            time.sleep(1.5)  # one more RSS sample after the load
        shed_metric = scrape(base, "tessera_shed_total")
    finally:
        stop_server(server)
    stats = [phase_stats(ph, sampler) for ph in opened["phases"]]
    return {"max_in_flight": max_in_flight, "stats": stats, "shed_metric": shed_metric,
            "connections": opened["connections"],
            "recovery_bound_ms": max(slo_ms, stats[0].ok_p99),
            "recovery_s": recovery_s(stats[2], max(slo_ms, stats[0].ok_p99))}


def report(run: dict, slo_ms: float) -> dict:
    stats = run["stats"]
    base_st, over, rec = stats
    print(f"\nserver max_in_flight={run['max_in_flight']}")
    print(f"{'phase':>6} {'offered':>8} {'admitted':>8} {'200':>7} {'503':>7} {'other':>6} "
          f"{'200 p50':>8} {'200 p99':>8} {'503 p99':>8} {'RSS MiB start/max/end':>22}")
    for s in stats:
        rss = f"{_fmt(s.rss_start, '.0f')}/{_fmt(s.rss_max, '.0f')}/{_fmt(s.rss_end, '.0f')}"
        print(f"{s.name:>6} {s.offered_rps:>8.1f} {s.admitted_rps:>8.1f} {s.ok:>7} {s.shed:>7} "
              f"{sum(s.other.values()):>6} {_fmt(s.ok_p50):>8} {_fmt(s.ok_p99):>8} "
              f"{_fmt(s.shed_p99):>8} {rss:>22}")
    others = {s.name: s.other for s in stats if s.other}
    print(f"failures other than 503: {others or 'none'}; 503s with Retry-After: "
          f"{sum(s.shed_with_retry_after for s in stats)} of {sum(s.shed for s in stats)} "
          f"(server tessera_shed_total={run['shed_metric']:g}); client connections opened: "
          f"{run['connections']}")
    back = run["recovery_s"]
    print(f"after the drop to 0.5x: 1-s window p99 (ms) "
          f"{[round(x) if x == x else None for x in rec.windows_p99]}; back under "
          f"{run['recovery_bound_ms']:.0f} ms (the SLO or the 1x p99, the larger) "
          f"{'never' if back is None else f'within {back:g} s'}")
    out = {"p99_ratio": over.ok_p99 / base_st.ok_p99,
           "admitted_ratio": over.admitted_rps / base_st.admitted_rps,
           "rss_growth": max(s.rss_max for s in stats) - base_st.rss_start,
           "base": base_st, "over": over, "rec": rec, "back": back,
           "other": sum(sum(s.other.values()) for s in stats)}
    print(f"overload vs 1x (same run): admitted p99 x{out['p99_ratio']:.2f} "
          f"({over.ok_p99:.1f} vs {base_st.ok_p99:.1f} ms), admitted rate "
          f"x{out['admitted_ratio']:.2f} ({over.admitted_rps:.1f} vs "
          f"{base_st.admitted_rps:.1f} rps), {over.shed / max(over.requests, 1):.0%} of the "
          f"offered load shed with 503 p99 {over.shed_p99:.1f} ms; server RSS "
          f"{base_st.rss_start:.0f} -> max {max(s.rss_max for s in stats):.0f} -> end "
          f"{rec.rss_end:.0f} MiB ({out['rss_growth']:+.0f})")
    return out


def soak_run(tmp: Path, url: str, bootstrap: str, users: list[str], *, minutes: int,
             rate: float, overload: float, candidates: int) -> dict:
    """One server (default settings) under ``minutes`` of open-loop load: every 5 minutes,
    4 at ``rate`` and 1 at ``rate * overload`` (shedding). Per minute: the RSS of the server
    and its background child (sampled every 5 s; the last sample of the minute), 200 p99,
    503s and other failures."""
    server, base = start_server(tmp, url, bootstrap, max_in_flight=None, candidates=candidates)
    try:
        with RssSampler(server.pid, interval_s=5.0, tree=True) as sampler:
            drive(base, {"mode": "closed", "users": users, "concurrency": [2],
                         "step_s": 2.0})  # warm-up, not recorded
            phases = []
            for m in range(minutes):
                over = m % 5 == 4
                phases.append({"name": f"min{m + 1}", "rate": rate * overload if over else rate,
                               "duration_s": 60.0})
            opened = drive(base, {"mode": "open", "users": users, "phases": phases})
            time.sleep(5.5)
    finally:
        stop_server(server)
    rows = []
    for ph in opened["phases"]:
        recs = ph["records"]
        rss = [v for t, v in sampler.samples if ph["wall_start"] <= t <= ph["wall_end"]]
        ok = [r for r in recs if r[2] == 200]
        rows.append({"minute": len(rows) + 1, "offered_rps": ph["rate"],
                     "rss_mb": rss[-1] if rss else float("nan"),
                     "rss_max_mb": max(rss) if rss else float("nan"),
                     "ok": len(ok), "shed": sum(1 for r in recs if r[2] == 503),
                     "other": sum(1 for r in recs if r[2] not in (200, 503)),
                     "p99_ms": _p(recs, 99, 200)})
    return {"rows": rows, "samples": sampler.samples}


def soak_report(run: dict, rate: float, overload: float, minutes: int) -> str:
    """Print the per-minute table and return the RESULT line."""
    rows = run["rows"]
    print(f"\nsoak: {minutes} minutes open loop, {rate:.1f} rps with every fifth minute at "
          f"{overload:g}x; RSS of the server and its background child (MiB, last sample of "
          "the minute; sampled every 5 s)")
    print(f"{'minute':>6} {'offered':>8} {'200':>6} {'503':>6} {'other':>6} {'200 p99':>8} "
          f"{'RSS':>7} {'RSS max':>8}")
    for r in rows:
        print(f"{r['minute']:>6} {r['offered_rps']:>8.1f} {r['ok']:>6} {r['shed']:>6} "
              f"{r['other']:>6} {_fmt(r['p99_ms']):>8} {_fmt(r['rss_mb'], '.0f'):>7} "
              f"{_fmt(r['rss_max_mb'], '.0f'):>8}")
    warm = min(5, len(rows)) - 1  # the level once caches and the snapshot are built
    steady = [r["rss_mb"] for r in rows[warm:]]
    minutes_after = np.arange(len(steady), dtype=np.float64)
    slope = float(np.polyfit(minutes_after, steady, 1)[0] * 10) if len(steady) > 2 else 0.0
    base_rows = [r for r in rows if r["offered_rps"] == rate]
    first, last = base_rows[:4], base_rows[-4:]
    p99_first = float(np.nanmax([r["p99_ms"] for r in first])) if first else float("nan")
    p99_last = float(np.nanmax([r["p99_ms"] for r in last])) if last else float("nan")
    other = sum(r["other"] for r in rows)
    print(f"RSS {rows[0]['rss_mb']:.0f} MiB after minute 1, {rows[warm]['rss_mb']:.0f} after "
          f"minute {warm + 1}, {rows[-1]['rss_mb']:.0f} at the end: {steady[-1] - steady[0]:+.0f} "
          f"MiB after minute {warm + 1} (least-squares slope {slope:+.1f} MiB per 10 minutes); "
          f"worst per-minute 200 p99 at {rate:.1f} rps: first 4 such minutes {p99_first:.1f} "
          f"ms, last 4 {p99_last:.1f} ms; failures other than 503: {other}")
    return (f"RESULT soak minutes={minutes} rate_rps={rate:.1f} overload_x={overload:g} "
            f"rss_min1_mb={rows[0]['rss_mb']:.0f} rss_min{warm + 1}_mb={rows[warm]['rss_mb']:.0f} "
            f"rss_end_mb={rows[-1]['rss_mb']:.0f} "
            f"rss_growth_after_min{warm + 1}_mb={steady[-1] - steady[0]:.0f} "
            f"rss_slope_mb_per_10min={slope:.1f} p99_first_ms={p99_first:.1f} "
            f"p99_last_ms={p99_last:.1f} other_failures={other}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small world, short phases")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--views", type=int, default=150_000)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--candidates", type=int, default=1_000,
                    help="trending candidates per request (the work per request)")
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--step-s", type=float, default=5.0, help="capacity step length")
    ap.add_argument("--phase-s", type=float, default=60.0, help="open-loop phase length")
    ap.add_argument("--overload", type=float, default=4.0, help="overload rate / capacity")
    ap.add_argument("--max-in-flight", type=int, default=None,
                    help="run only this server max_in_flight (default: ServingConfig's, then "
                    "one sized from the capacity measurement)")
    ap.add_argument("--soak", type=int, default=None, metavar="MINUTES",
                    help="instead of the overload phases: MINUTES of steady load at 0.7x the "
                    "capacity, every fifth minute at --overload x, RSS per minute")
    args = ap.parse_args()
    if args.quick:
        args.items, args.views, args.users = 3_000, 20_000, 500
        args.step_s, args.phase_s = 3.0, 8.0
    if args.soak is not None and args.soak < 2:
        ap.error("--soak needs at least 2 minutes")

    from serving.config import ServingConfig
    from tessera.broker import EmbeddedBroker
    from tessera.logs import configure_logging
    from tessera.topics import PLATFORM_TOPICS, create_topics

    configure_logging(level="WARNING")
    default_mif = ServingConfig().max_in_flight
    t_start = time.perf_counter()
    print(f"machine: {os.cpu_count()} cores shared by the load generator, the server and the "
          "embedded broker", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as d, EmbeddedBroker(state_dir=Path(d) / "broker") as info:
        tmp = Path(d)
        create_topics(info.bootstrap, PLATFORM_TOPICS, partitions=2)
        url, users = build_store(tmp, info.bootstrap, n_items=args.items, views=args.views,
                                 n_users=args.users)
        users = users[:2000]
        print(f"store: {args.items:,} items, {len(users):,} users; setup "
              f"{time.perf_counter() - t_start:.0f}s", flush=True)
        server, base = start_server(tmp, url, info.bootstrap, max_in_flight=64,
                                    candidates=args.candidates)
        try:
            cap = measure_capacity(base, users, slo_ms=args.slo_ms, step_s=args.step_s,
                                   max_clients=32)
        finally:
            stop_server(server)
        print(f"\ncapacity: closed loop ({args.step_s:g} s a step, SLO p99 < {args.slo_ms:g} ms)")
        print(f"{'clients':>7} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
        for r in cap.rows:
            print(f"{r['concurrency']:>7} {r['rps']:>8.1f} {_fmt(r['p50']):>8} "
                  f"{_fmt(r['p99']):>8} {r['failed']:>7}")
        if args.soak is not None:
            rate = round(0.7 * cap.rps, 1)
            run = soak_run(tmp, url, info.bootstrap, users, minutes=args.soak, rate=rate,
                           overload=args.overload, candidates=args.candidates)
            line = soak_report(run, rate, args.overload, args.soak)
            print(f"\ntotal run time {time.perf_counter() - t_start:.0f}s")
            print("\n" + line)
            return
        sized = max(2, 2 * cap.clients)
        print(f"capacity: {cap.rps:.1f} rps at {cap.clients} clients; max_in_flight sized from "
              f"it: 2 x {cap.clients} = {sized}", flush=True)
        configs = [args.max_in_flight] if args.max_in_flight else \
            list(dict.fromkeys([default_mif, sized]))
        for mif in configs:
            runs.append(overload_run(tmp, url, info.bootstrap, users, max_in_flight=mif,
                                     candidates=args.candidates, rate=cap.rps,
                                     overload=args.overload, phase_s=args.phase_s,
                                     slo_ms=args.slo_ms))
            print(f"ran max_in_flight={mif} ({time.perf_counter() - t_start:.0f}s)", flush=True)

    print(f"\nopen loop, {args.phase_s:g} s a phase, back to back: 1x = {cap.rps:.1f} rps, "
          f"{args.overload:g}x, 0.5x (latency from each request's scheduled send time)")
    outs = [report(r, args.slo_ms) for r in runs]
    print(f"\nthe load generator, the server and the broker share {os.cpu_count()} cores "
          f"(other load on the machine shows up in these numbers); total run time "
          f"{time.perf_counter() - t_start:.0f}s")
    fields = [f"capacity_rps={cap.rps:.1f}", f"capacity_clients={cap.clients}",
              f"slo_ms={args.slo_ms:g}", f"overload_x={args.overload:g}"]
    for run, o in zip(runs, outs):
        tag = "default" if run["max_in_flight"] == default_mif and not args.max_in_flight \
            else "sized" if not args.max_in_flight else "mif"
        back = "none" if o["back"] is None else f"{o['back']:g}"
        fields += [f"{tag}_max_in_flight={run['max_in_flight']}",
                   f"{tag}_base_p99_ms={o['base'].ok_p99:.1f}",
                   f"{tag}_overload_p99_ms={o['over'].ok_p99:.1f}",
                   f"{tag}_p99_ratio={o['p99_ratio']:.2f}",
                   f"{tag}_admitted_ratio={o['admitted_ratio']:.2f}",
                   f"{tag}_shed={o['over'].shed}", f"{tag}_shed_p99_ms={o['over'].shed_p99:.1f}",
                   f"{tag}_other_failures={o['other']}", f"{tag}_recovery_s={back}",
                   f"{tag}_rss_growth_mb={o['rss_growth']:.0f}"]
    print("\nRESULT overload " + " ".join(fields))


if __name__ == "__main__":
    if "--loadgen" in sys.argv:
        loadgen_process()
    else:
        main()
