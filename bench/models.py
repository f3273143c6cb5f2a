"""Benchmark: L2 in ONNX Runtime vs torch eager, L1 over thousands, HNSW vs brute force.

In one run, on the same weights and inputs:

* L2 (DCN-v2, 5 task heads, 20 dense features, 4 hashed id fields, a 20-item sequence):
  scoring 500 candidates with ONNX Runtime (CPU provider, 1 thread) vs torch eager
  (1 thread), p50/p99 over the runs; the export's parity check runs first;
* L1 (a 4-feature MLP) over 5,000 candidates in ONNX Runtime and torch;
* HNSW (``models.index.ItemIndex``) over 200,000 clustered item vectors: single-query
  latency p50/p99 and recall@100 against exact brute force (numpy), whose latency is the
  baseline.

Usage: python bench/models.py [--quick] [--items N] [--runs R] [--queries Q]
Last line: RESULT models l2_onnx_p99_ms=<a> torch_p99_ms=<b> ratio=<torch/onnx p99>
           hnsw_recall100=<c> hnsw_p99_ms=<d>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the ``models`` package: drop its own directory from the import
# path so ``import models`` finds the package (the repository root), not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.index import IndexParams, ItemIndex, exact_search  # noqa: E402
from models.onnx_export import export_onnx, onnx_session  # noqa: E402
from models.rankers import L1Ranker, L2Ranker  # noqa: E402

L2_BUCKETS = (50_000, 100_000, 10_000, 1_000)  # user, item, author, topic
TASKS = ("click", "like", "share", "save", "hide")
N_DENSE = 20
SEQ_LEN = 20


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    """Return (p50, p99) in milliseconds."""
    a = np.asarray(samples_s) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def timed(fn, runs: int, warmup: int = 10) -> list[float]:
    """Call ``fn`` ``warmup`` times, then time ``runs`` calls (seconds each)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def l2_inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random candidates: standardized dense features, hashed ids, a partly padded sequence."""
    ids = np.stack([rng.integers(1, b, n) for b in L2_BUCKETS], axis=1).astype(np.int64)
    seq = rng.integers(1, L2_BUCKETS[1], (n, SEQ_LEN)).astype(np.int64)
    seq[:, rng.integers(5, SEQ_LEN):] = 0
    return {"dense": rng.standard_normal((n, N_DENSE)).astype(np.float32), "ids": ids, "seq": seq}


def bench_model(model: torch.nn.Module, inputs: dict[str, np.ndarray], names: list[str],
                output: str, path: Path, runs: int) -> dict[str, float]:
    """Export (with the parity check), then time ONNX Runtime and torch eager on ``inputs``."""
    model.eval()
    report = export_onnx(model, inputs, path, names, [output])
    session = onnx_session(path, threads=1)
    tensors = [torch.from_numpy(inputs[n]) for n in names]

    def run_torch() -> None:
        with torch.inference_mode():
            model(*tensors)

    onnx_s = timed(lambda: session.run([output], inputs), runs)
    torch_s = timed(run_torch, runs)
    o50, o99 = percentiles(onnx_s)
    t50, t99 = percentiles(torch_s)
    return {"onnx_p50": o50, "onnx_p99": o99, "torch_p50": t50, "torch_p99": t99,
            "parity": report.max_abs_diff}


def clustered_vectors(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (like item embeddings by topic)."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    ap.add_argument("--items", type=int, default=None, help="HNSW items (default 200,000)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per model (default 500)")
    ap.add_argument("--queries", type=int, default=None, help="HNSW queries (default 1,000)")
    ap.add_argument("--dim", type=int, default=32)
    args = ap.parse_args()
    items = args.items or (20_000 if args.quick else 200_000)
    runs = args.runs or (50 if args.quick else 500)
    queries = args.queries or (200 if args.quick else 1_000)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        l2 = L2Ranker(n_dense=N_DENSE, id_buckets=L2_BUCKETS, seq_buckets=L2_BUCKETS[1],
                      tasks=TASKS, item_field=1)
        r2 = bench_model(l2, l2_inputs(rng, 500), ["dense", "ids", "seq"], "probs",
                         Path(tmp) / "l2.onnx", runs)
        l1 = L1Ranker(n_dense=4)
        r1 = bench_model(l1, {"dense": rng.standard_normal((5_000, 4)).astype(np.float32)},
                         ["dense"], "score", Path(tmp) / "l1.onnx", runs)

    ids = [f"i{k}" for k in range(items)]
    vectors = clustered_vectors(rng, items, args.dim, clusters=64)
    t = time.perf_counter()
    params = IndexParams()  # the defaults serving's index is built with
    index = ItemIndex.build(ids, vectors, M=params.M,
                            ef_construction=params.ef_construction, ef=params.ef)
    build_s = time.perf_counter() - t
    q = clustered_vectors(rng, queries, args.dim, clusters=64)
    exact, _ = exact_search(ids, vectors, q, 100)
    approx, _ = index.search(q, 100)
    recall = float(np.mean([len(set(a) & set(e)) / 100 for a, e in zip(approx, exact)]))
    hnsw_s, brute_s = [], []
    for row in q:
        t = time.perf_counter()
        index.search(row, 100)
        hnsw_s.append(time.perf_counter() - t)
    for row in q[: max(20, queries // 10)]:
        t = time.perf_counter()
        exact_search(ids, vectors, row, 100)
        brute_s.append(time.perf_counter() - t)
    h50, h99 = percentiles(hnsw_s)
    b50, b99 = percentiles(brute_s)

    ratio = r2["torch_p99"] / r2["onnx_p99"]
    print(f"models benchmark: {runs} runs per model, 1 thread; HNSW over {items:,} items "
          f"(dim {args.dim}, M={params.M}, ef_construction={params.ef_construction}, "
          f"ef={params.ef}, built in {build_s:.1f} s), "
          f"{queries} queries")
    print(f"{'what':<38}{'p50 ms':>10}{'p99 ms':>10}")
    rows = [
        ("L2 500 candidates, ONNX Runtime", r2["onnx_p50"], r2["onnx_p99"]),
        ("L2 500 candidates, torch eager", r2["torch_p50"], r2["torch_p99"]),
        ("L1 5,000 candidates, ONNX Runtime", r1["onnx_p50"], r1["onnx_p99"]),
        ("L1 5,000 candidates, torch eager", r1["torch_p50"], r1["torch_p99"]),
        ("HNSW top-100, one query", h50, h99),
        ("brute force top-100, one query", b50, b99),
    ]
    for name, p50, p99 in rows:
        print(f"{name:<38}{p50:>10.3f}{p99:>10.3f}")
    print(f"L2 torch/ONNX p99 ratio {ratio:.2f}; L1 ONNX {r1['onnx_p50'] / 50 * 1e3:.1f} us per "
          f"100 candidates (p50); parity max abs diff L2 {r2['parity']:.1e}, L1 "
          f"{r1['parity']:.1e}")
    print(f"HNSW recall@100 vs exact {recall:.4f}; brute/HNSW p99 {b99 / h99:.1f}x")
    print(f"\nRESULT models l2_onnx_p99_ms={r2['onnx_p99']:.3f} torch_p99_ms={r2['torch_p99']:.3f} "
          f"ratio={ratio:.2f} hnsw_recall100={recall:.4f} hnsw_p99_ms={h99:.3f} "
          f"l1_onnx_p99_ms={r1['onnx_p99']:.3f} brute_p99_ms={b99:.3f}")


if __name__ == "__main__":
    main()
