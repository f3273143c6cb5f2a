"""Train the retrieval towers and the L1/L2 rankers from streamed training rows.

Each ``train_*`` function makes the same passes over an :class:`models.data.ExampleSource`:

1. a fitting pass over the training range: dense feature statistics (the
   :class:`models.features.FeatureSchema`), label base rates (which tasks have labels)
   and, for retrieval, item frequencies (the logQ correction) and the item catalogue;
2. ``epochs`` training passes, each batch shuffled with a seeded generator;
3. an evaluation pass over the later evaluation range: AUC and normalized cross entropy
   per task, nDCG@k per request, recall@k for retrieval.

Only one source batch (``batch_rows`` rows) is decoded at a time. Runs are deterministic
for a seed: torch and numpy are seeded and torch runs on ``threads`` threads (restored
afterwards). Progress is reported through a callback (the command line draws a bar).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from features.offline.training import LABEL_ACTIONS, label_column
from models import metrics as M
from models.data import ExampleSource, TimeRange, decode_batch
from models.features import (
    CategoricalField,
    CrossFeature,
    DenseStats,
    FeatureSchema,
    KeyRate,
    KeyShare,
    categorical_matrix,
    dense_matrix,
    select_dense,
    sequence_matrix,
)
from models.rankers import DEFAULT_TASK_WEIGHTS, L1Ranker, L2Ranker, combine_scores
from models.towers import TwoTower

__all__ = [
    "ExportSpec",
    "ItemCatalog",
    "ProgressEvent",
    "RankerFeatures",
    "RetrievalFeatures",
    "TrainConfig",
    "TrainResult",
    "train_l1",
    "train_l2",
    "train_retrieval",
]

ModelKind = Literal["retrieval", "l1", "l2"]
_ID_COLUMNS = ("impression_id", "request_id", "user_id", "item_id", "author_id", "topic",
               "event_ts", "position")
_POSITIVE_ACTIONS = ("click", "like", "share", "save")

_COUNT_FEATURES = (
    "item_views_1h", "item_views_1d", "item_views_7d", "item_impressions_1d",
    "item_impressions_7d", "item_clicks_1d", "item_clicks_7d", "item_likes_7d",
    "item_hides_7d", "item_unique_viewers_7d", "user_views_1d", "user_views_7d",
    "user_clicks_7d", "user_topics_distinct_7d", "author_views_7d", "item_dwell_mean_7d",
)


@dataclass(frozen=True)
class ProgressEvent:
    """``rows`` more rows were processed in ``stage`` (of ``total`` rows, when known)."""

    stage: str
    rows: int
    total: int | None


Progress = Callable[[ProgressEvent], None]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimization settings shared by every model.

    Args:
        epochs: passes over the training range.
        batch_size: rows per gradient step.
        lr: Adam learning rate.
        seed: seeds torch and the shuffling.
        threads: torch intra-op threads during the run.
        eval_k: the k of nDCG@k (rankers); retrieval reports recall at ``recall_ks``.
        recall_ks: the ks of recall@k (retrieval).
        holdout_rows: evaluation rows kept as the ONNX parity set.
    """

    epochs: int = 2
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1
    eval_k: int = 10
    recall_ks: tuple[int, ...] = (10, 50, 100)
    holdout_rows: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "threads", "eval_k", "holdout_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a number > 0, got {self.lr!r}")


@dataclass(frozen=True, kw_only=True)
class RankerFeatures:
    """Which inputs a ranker reads (names as logged online or backfilled).

    ``categorical`` maps an id column to its hash buckets; ``sequence`` names the field of
    recent item ids (hashed with the ``item_id`` buckets when present). L1 uses only
    ``dense``.
    """

    dense: tuple[str, ...]
    log1p: tuple[str, ...] = ()
    categorical: Mapping[str, int] = field(default_factory=lambda: {
        "user_id": 50_000, "item_id": 100_000, "author_id": 10_000, "topic": 1_000})
    sequence: str | None = "user_recent_items_1d"
    sequence_length: int = 20
    crosses: tuple[CrossFeature, ...] = ()

    def __post_init__(self) -> None:
        missing = [k.name for k in self.crosses if k.name not in self.dense]
        if missing:
            raise ValueError(f"RankerFeatures: cross features {missing} must be listed in dense")

    @property
    def columns(self) -> list[str]:
        """Feature columns to read: dense (less computed crosses), then the crosses' lists."""
        computed = {k.name for k in self.crosses}
        cols = [n for n in self.dense if n not in computed]
        cols += [name for k in self.crosses for name in k.lists]
        return list(dict.fromkeys(cols))


@dataclass(frozen=True, kw_only=True)
class RetrievalFeatures:
    """Which inputs the two towers read: user dense + sequence; item ids + item dense."""

    user_dense: tuple[str, ...] = ("user_views_7d", "user_clicks_7d", "user_topics_distinct_7d")
    item_dense: tuple[str, ...] = ("item_views_7d", "item_ctr_7d", "author_views_7d")
    log1p: tuple[str, ...] = ("user_views_7d", "user_clicks_7d", "user_topics_distinct_7d",
                              "item_views_7d", "author_views_7d")
    item_buckets: int = 100_000
    author_buckets: int = 10_000
    topic_buckets: int = 1_000
    sequence: str = "user_recent_items_1d"
    sequence_length: int = 20
    positive_actions: tuple[str, ...] = _POSITIVE_ACTIONS
    dim: int = 32


TOPIC_CROSSES: tuple[CrossFeature, ...] = (
    KeyRate("topic_long_view_rate_7d", key="topic", hits="user_long_view_topics_7d",
            trials="user_recent_topics_7d"),
    KeyShare("topic_share_engaged_7d", key="topic", values="user_engaged_topics_7d"),
    KeyShare("topic_share_viewed_7d", key="topic", values="user_recent_topics_7d"),
)
"""User x topic affinity, from the user's recent views and positive engagements: how often
they dwell on the candidate's topic when shown it, and its share of what they engaged with
and viewed. Ids alone learn this slowly; these make it one input."""

DEFAULT_L1_FEATURES = RankerFeatures(
    dense=("item_ctr_1d", "item_ctr_7d", "item_views_1d", "user_clicks_7d",
           *(k.name for k in TOPIC_CROSSES)),
    log1p=("item_views_1d", "user_clicks_7d"), categorical={}, sequence=None,
    crosses=TOPIC_CROSSES,
)
DEFAULT_L2_FEATURES = RankerFeatures(
    dense=(*_COUNT_FEATURES, "item_ctr_1d", "item_ctr_7d", *(k.name for k in TOPIC_CROSSES)),
    log1p=_COUNT_FEATURES, crosses=TOPIC_CROSSES,
)


@dataclass
class ExportSpec:
    """One module to export: its input/output names and held-out inputs for the parity check."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    holdout: dict[str, np.ndarray]


@dataclass
class ItemCatalog:
    """Every item seen in the data with its item-tower inputs (latest values), for the index."""

    ids: list[str]
    inputs: dict[str, np.ndarray]


@dataclass
class TrainResult:
    """A trained model, its schema, its evaluation, and what to export."""

    kind: ModelKind
    model: nn.Module
    schema: FeatureSchema
    metrics: dict[str, Any]
    train_range: TimeRange
    eval_range: TimeRange
    exports: dict[str, ExportSpec]
    tasks: list[str] = field(default_factory=list)
    task_weights: dict[str, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    catalog: ItemCatalog | None = None

    @property
    def training_range(self) -> dict[str, dict[str, int]]:
        """The manifest's ``training_range``: train and eval ranges."""
        return {"train": self.train_range.as_dict(), "eval": self.eval_range.as_dict()}


# ---------------------------------------------------------------- shared machinery


class _Run:
    """Seeding, thread count and progress for one training run (a context manager)."""

    def __init__(self, config: TrainConfig, progress: Progress | None):
        self.config = config
        self.progress = progress
        self.rng = np.random.default_rng(config.seed)

    def __enter__(self) -> _Run:
        self._threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._threads)

    def stream(self, source: ExampleSource, time_range: TimeRange, stage: str,
               columns: Sequence[str], features: Sequence[str]) -> Iterator[dict[str, Any]]:
        total = source.count(time_range) if self.progress else None
        for b in source.batches(time_range, columns):
            if self.progress:
                self.progress(ProgressEvent(stage, b.num_rows, total))
            yield decode_batch(b, features)


def _columns(source: ExampleSource, features: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Columns to scan: ids, labels, wanted features as columns or backfills, else the JSON."""
    have = set(source.column_names())
    cols = [c for c in (*_ID_COLUMNS, *extra) if c in have]
    cols += [label_column(a) for a in LABEL_ACTIONS if label_column(a) in have]
    need_json = False
    for f in features:
        found = [c for c in (f"feature_{f}", f) if c in have]
        cols += found
        need_json = need_json or not found
    if need_json and "features" in have:
        cols.append("features")
    return list(dict.fromkeys(cols))


def _labels(batch: Mapping[str, Any], tasks: Sequence[str]) -> np.ndarray:
    n = len(batch["event_ts"])
    out = np.zeros((n, len(tasks)), dtype=np.float32)
    for j, t in enumerate(tasks):
        col = batch.get(label_column(t))
        if col is not None:
            out[:, j] = np.nan_to_num(np.asarray(col, dtype=np.float64)) > 0
    return out


def _minibatches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for k in range(0, n, size):
        yield order[k:k + size]


def _holdout(inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[:rows]) for k, v in inputs.items()}


def _concat_holdout(parts: list[dict[str, np.ndarray]], rows: int) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return _holdout({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, rows)


class _Fit:
    """What the fitting pass learns: dense stats, label counts, rows."""

    def __init__(self, dense: Sequence[str], log1p: Sequence[str],
                 crosses: Sequence[CrossFeature] = ()):
        self.stats = DenseStats(dense, [n for n in log1p if n in dense], crosses=crosses)
        self.rows = 0
        self.positives: Counter[str] = Counter()

    def update(self, batch: Mapping[str, Any]) -> None:
        self.stats.update(batch)
        labels = _labels(batch, LABEL_ACTIONS)
        self.rows += len(labels)
        for j, a in enumerate(LABEL_ACTIONS):
            self.positives[a] += int(labels[:, j].sum())

    def base_rate(self, task: str) -> float:
        return self.positives[task] / self.rows if self.rows else float("nan")


def _require_rows(fit: _Fit, time_range: TimeRange, what: str) -> None:
    if fit.rows == 0:
        from models.data import TrainingDataError

        raise TrainingDataError(
            f"no training rows for {what} in [{time_range.start}, {time_range.end}); "
            "check --from/--to and --version"
        )


def _ranking_metrics(tasks: Sequence[str], labels: np.ndarray, probs: np.ndarray,
                     base_rates: Mapping[str, float], requests: Sequence[Any],
                     weights: Mapping[str, float], k: int) -> dict[str, Any]:
    out: dict[str, Any] = {"eval_rows": int(len(labels))}
    for j, t in enumerate(tasks):
        out[f"auc_{t}"] = M.auc(labels[:, j], probs[:, j])
        out[f"nce_{t}"] = M.normalized_cross_entropy(labels[:, j], probs[:, j], base_rates[t])
        out[f"positives_{t}"] = int(labels[:, j].sum())
        out[f"ndcg@{k}_{t}"] = M.grouped_ndcg_at_k(requests, labels[:, j], probs[:, j], k)
    if len(tasks):
        by_task = {t: probs[:, j] for j, t in enumerate(tasks)}
        w = {t: v for t, v in weights.items() if t in by_task}
        score = combine_scores(by_task, w)
        gains = sum(max(w.get(t, 0.0), 0.0) * labels[:, j] for j, t in enumerate(tasks))
        out[f"ndcg@{k}"] = M.grouped_ndcg_at_k(requests, gains, score, k)
    return M.clean(out)


# ---------------------------------------------------------------- L1 and L2


def _ranker_schema(fit: _Fit, feats: RankerFeatures, *, with_ids: bool) -> FeatureSchema:
    cats = tuple(CategoricalField(n, int(b)) for n, b in feats.categorical.items()) \
        if with_ids else ()
    seq_buckets = int(feats.categorical.get("item_id", 100_000))
    return FeatureSchema(
        dense=fit.stats.features(), categorical=cats,
        sequence=feats.sequence if with_ids else None,
        sequence_length=feats.sequence_length if with_ids and feats.sequence else 0,
        sequence_buckets=seq_buckets, crosses=tuple(feats.crosses),
    )


def _ranker_inputs(batch: Mapping[str, Any], schema: FeatureSchema,
                   with_ids: bool) -> dict[str, np.ndarray]:
    inputs = {"dense": dense_matrix(batch, schema)}
    if with_ids:
        inputs["ids"] = categorical_matrix(batch, schema)
        inputs["seq"] = sequence_matrix(batch, schema)
    return inputs


def _train_ranker(kind: ModelKind, source: ExampleSource, train_range: TimeRange,
                  eval_range: TimeRange, feats: RankerFeatures, config: TrainConfig,
                  progress: Progress | None, tasks: Sequence[str] | None,
                  min_positives: int, task_weights: Mapping[str, float]) -> TrainResult:
    with_ids = kind == "l2"
    wanted = feats.columns + ([feats.sequence] if with_ids and feats.sequence else [])
    extra = list(feats.categorical) if with_ids else []
    cols = _columns(source, wanted, extra)
    with _Run(config, progress) as run:
        fit = _Fit(feats.dense, feats.log1p, feats.crosses)
        for batch in run.stream(source, train_range, "fit", cols, wanted):
            fit.update(batch)
        _require_rows(fit, train_range, kind)
        if kind == "l1":
            use_tasks = ["click"]
        elif tasks is not None:
            use_tasks = list(tasks)
        else:
            use_tasks = [a for a in LABEL_ACTIONS if fit.positives[a] >= min_positives]
            use_tasks = use_tasks or ["click"]
        schema = _ranker_schema(fit, feats, with_ids=with_ids)
        if kind == "l1":
            model: nn.Module = L1Ranker(n_dense=len(schema.dense))
        else:
            names = schema.categorical_names
            model = L2Ranker(
                n_dense=len(schema.dense), id_buckets=[c.buckets for c in schema.categorical],
                seq_buckets=schema.sequence_buckets, tasks=use_tasks,
                item_field=names.index("item_id") if "item_id" in names else None,
            )
        opt = torch.optim.Adam(model.parameters(), lr=config.lr,
                               weight_decay=config.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        history = []
        for epoch in range(config.epochs):
            model.train()
            total, steps = 0.0, 0
            for batch in run.stream(source, train_range, f"epoch {epoch + 1}", cols, wanted):
                inputs = {k: torch.from_numpy(v) for k, v in
                          _ranker_inputs(batch, schema, with_ids).items()}
                y = torch.from_numpy(_labels(batch, use_tasks))
                for idx in _minibatches(len(y), config.batch_size, run.rng):
                    t = torch.from_numpy(idx)
                    logits = model.logits(*(v[t] for v in inputs.values()))
                    loss = loss_fn(logits.reshape(len(t), -1), y[t])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item()
                    steps += 1
            history.append(total / max(steps, 1))
        model.eval()
        labels, probs, requests, held = [], [], [], []
        with torch.no_grad():
            for batch in run.stream(source, eval_range, "eval", cols, wanted):
                inputs = _ranker_inputs(batch, schema, with_ids)
                p = model(*(torch.from_numpy(v) for v in inputs.values())).numpy()
                probs.append(p.reshape(len(p), -1))
                labels.append(_labels(batch, use_tasks))
                requests += list(batch.get("request_id") or batch.get("user_id") or [])
                if sum(len(h["dense"]) for h in held) < config.holdout_rows:
                    held.append(inputs)
        weights = {t: float(task_weights.get(t, 0.0)) for t in use_tasks}
        if not labels:
            metrics: dict[str, Any] = {"eval_rows": 0}
        else:
            metrics = _ranking_metrics(use_tasks, np.concatenate(labels), np.concatenate(probs),
                                       {t: fit.base_rate(t) for t in use_tasks}, requests,
                                       weights, config.eval_k)
        metrics.update(train_rows=fit.rows, train_loss=history[-1] if history else None)
        metrics["base_rates"] = M.clean({t: fit.base_rate(t) for t in use_tasks})
    input_names = ["dense", "ids", "seq"] if with_ids else ["dense"]
    output = ["probs"] if with_ids else ["score"]
    spec = ExportSpec(model, input_names, output, _concat_holdout(held, config.holdout_rows))
    return TrainResult(kind=kind, model=model, schema=schema, metrics=metrics,
                       train_range=train_range, eval_range=eval_range,
                       exports={kind: spec}, tasks=use_tasks, task_weights=weights,
                       history=history)


def train_l1(source: ExampleSource, train_range: TimeRange, eval_range: TimeRange, *,
             features: RankerFeatures = DEFAULT_L1_FEATURES,
             config: TrainConfig = TrainConfig(),
             progress: Progress | None = None) -> TrainResult:
    """Train the L1 ranker (click probability from a few dense features).

    Returns:
        A :class:`TrainResult` whose ``exports`` hold ``{"l1": dense -> score}``.

    Raises:
        TrainingDataError: no training rows in ``train_range``.
    """
    return _train_ranker("l1", source, train_range, eval_range, features, config, progress,
                         ["click"], 1, {"click": 1.0})


def train_l2(source: ExampleSource, train_range: TimeRange, eval_range: TimeRange, *,
             features: RankerFeatures = DEFAULT_L2_FEATURES,
             config: TrainConfig = TrainConfig(),
             tasks: Sequence[str] | None = None, min_positives: int = 20,
             task_weights: Mapping[str, float] = DEFAULT_TASK_WEIGHTS,
             progress: Progress | None = None) -> TrainResult:
    """Train the multi-task L2 ranker (DCN-v2).

    Args:
        tasks: engagement types to predict; default: every label with at least
            ``min_positives`` positives in the training range.
        task_weights: weights of the combined score (stored with the model).

    Returns:
        A :class:`TrainResult` whose ``exports`` hold ``{"l2": (dense, ids, seq) -> probs}``.

    Raises:
        TrainingDataError: no training rows in ``train_range``.
    """
    return _train_ranker("l2", source, train_range, eval_range, features, config, progress,
                         tasks, min_positives, task_weights)


# ---------------------------------------------------------------- retrieval


def _is_positive(batch: Mapping[str, Any], actions: Sequence[str]) -> np.ndarray:
    return _labels(batch, actions).max(axis=1, initial=0.0) > 0


class _Catalog:
    """Latest item-tower inputs per item id (raw values, transformed at the end)."""

    def __init__(self, dense: Sequence[str]):
        self.dense = list(dense)
        self.rows: dict[str, tuple[int, str, str, list[Any]]] = {}

    def update(self, batch: Mapping[str, Any]) -> None:
        cols = [batch.get(n) for n in self.dense]
        for i, (item, ts) in enumerate(zip(batch["item_id"], batch["event_ts"])):
            old = self.rows.get(item)
            if old is None or ts >= old[0]:
                vals = [None if c is None else c[i] for c in cols]
                self.rows[item] = (int(ts), batch["author_id"][i], batch["topic"][i], vals)

    def build(self, schema: FeatureSchema, item_schema: FeatureSchema) -> ItemCatalog:
        ids = sorted(self.rows)
        table = {"item_id": ids,
                 "author_id": [self.rows[i][1] for i in ids],
                 "topic": [self.rows[i][2] for i in ids]}
        for j, n in enumerate(self.dense):
            table[n] = [self.rows[i][3][j] for i in ids]
        return ItemCatalog(ids, {"item_ids": categorical_matrix(table, schema),
                                 "item_dense": dense_matrix(table, item_schema)})


def _tower_inputs(batch: Mapping[str, Any], schema: FeatureSchema, user: FeatureSchema,
                  item: FeatureSchema) -> dict[str, np.ndarray]:
    return {"seq": sequence_matrix(batch, schema), "user_dense": dense_matrix(batch, user),
            "item_ids": categorical_matrix(batch, schema), "item_dense": dense_matrix(batch, item)}


def train_retrieval(source: ExampleSource, train_range: TimeRange, eval_range: TimeRange, *,
                    features: RetrievalFeatures = RetrievalFeatures(),
                    config: TrainConfig = TrainConfig(),
                    progress: Progress | None = None) -> TrainResult:
    """Train the two towers with in-batch negatives and the logQ popularity correction.

    Positives are rows with any of ``features.positive_actions``. For a batch of positive
    pairs the logits are ``u_i . v_j / temperature - log q(item_j)``, where ``q`` is the
    item's share of training positives; other rows of the same item are masked out (they
    are not negatives). Recall@k is measured per evaluation user: the user's embedding at
    their first evaluation row against every catalogued item, relevant = the items the
    user engaged with in the evaluation range; ``popularity_recall@k`` ranks by training
    positives instead, the baseline.

    Returns:
        A :class:`TrainResult` with ``exports`` ``{"user_tower", "item_tower"}`` and the
        item ``catalog`` (for the HNSW index).

    Raises:
        TrainingDataError: no positive rows in ``train_range``.
    """
    f = features
    dense = [*f.user_dense, *f.item_dense]
    wanted = [*dense, f.sequence]
    cols = _columns(source, wanted)
    with _Run(config, progress) as run:
        fit = _Fit(dense, f.log1p)
        freq: Counter[str] = Counter()
        catalog = _Catalog(f.item_dense)
        for batch in run.stream(source, train_range, "fit", cols, wanted):
            fit.update(batch)
            catalog.update(batch)
            pos = _is_positive(batch, f.positive_actions)
            freq.update(v for v, p in zip(batch["item_id"], pos) if p)
        _require_rows(fit, train_range, "retrieval")
        n_pos = sum(freq.values())
        if n_pos == 0:
            from models.data import TrainingDataError

            raise TrainingDataError(
                f"no positive rows ({', '.join(f.positive_actions)}) to train retrieval on in "
                f"[{train_range.start}, {train_range.end}); widen the range"
            )
        schema = FeatureSchema(
            dense=fit.stats.features(),
            categorical=(CategoricalField("item_id", f.item_buckets),
                         CategoricalField("author_id", f.author_buckets),
                         CategoricalField("topic", f.topic_buckets)),
            sequence=f.sequence, sequence_length=f.sequence_length,
            sequence_buckets=f.item_buckets,
            extra={"user_dense": list(f.user_dense), "item_dense": list(f.item_dense),
                   "positive_actions": list(f.positive_actions)},
        )
        user_schema = select_dense(schema, f.user_dense)
        item_schema = select_dense(schema, f.item_dense)
        model = TwoTower(seq_buckets=f.item_buckets, n_user_dense=len(f.user_dense),
                         id_buckets=[c.buckets for c in schema.categorical],
                         n_item_dense=len(f.item_dense), dim=f.dim)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr,
                               weight_decay=config.weight_decay)
        history = []
        for epoch in range(config.epochs):
            model.train()
            total, steps = 0.0, 0
            for batch in run.stream(source, train_range, f"epoch {epoch + 1}", cols, wanted):
                pos = np.flatnonzero(_is_positive(batch, f.positive_actions))
                if len(pos) < 2:
                    continue
                sub = {k: [v[i] for i in pos] if isinstance(v, list) else v[pos]
                       for k, v in batch.items()}
                x = {k: torch.from_numpy(v)
                     for k, v in _tower_inputs(sub, schema, user_schema, item_schema).items()}
                logq = torch.tensor([math.log(freq.get(i, 1) / n_pos) for i in sub["item_id"]],
                                    dtype=torch.float32)
                for idx in _minibatches(len(pos), config.batch_size, run.rng):
                    if len(idx) < 2:
                        continue
                    t = torch.from_numpy(idx)
                    u, v = model(x["seq"][t], x["user_dense"][t], x["item_ids"][t],
                                 x["item_dense"][t])
                    logits = u @ v.T / model.temperature - logq[t][None, :]
                    item = x["item_ids"][t][:, 0]
                    same = (item[:, None] == item[None, :]) & ~torch.eye(len(t), dtype=torch.bool)
                    logits = logits.masked_fill(same, -1e9)
                    loss = nn.functional.cross_entropy(logits, torch.arange(len(t)))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item()
                    steps += 1
            history.append(total / max(steps, 1))
        model.eval()
        first_row: dict[str, dict[str, Any]] = {}
        relevant: dict[str, set[str]] = {}
        held_user, held_item = [], []
        for batch in run.stream(source, eval_range, "eval", cols, wanted):
            catalog.update(batch)
            pos = _is_positive(batch, f.positive_actions)
            for i, user in enumerate(batch["user_id"]):
                if user not in first_row:
                    first_row[user] = {k: [v[i]] if isinstance(v, list) else v[i:i + 1]
                                       for k, v in batch.items()}
                if pos[i]:
                    relevant.setdefault(user, set()).add(batch["item_id"][i])
            if sum(len(h["seq"]) for h in held_user) < config.holdout_rows:
                x = _tower_inputs(batch, schema, user_schema, item_schema)
                held_user.append({"seq": x["seq"], "user_dense": x["user_dense"]})
                held_item.append({"item_ids": x["item_ids"], "item_dense": x["item_dense"]})
        items = catalog.build(schema, item_schema)
        metrics: dict[str, Any] = {"train_rows": fit.rows, "train_positives": n_pos,
                                   "catalog_items": len(items.ids),
                                   "train_loss": history[-1] if history else None}
        users = sorted(u for u in relevant if u in first_row)
        metrics["eval_users"] = len(users)
        if users:
            with torch.no_grad():
                item_vecs = model.item_tower(torch.from_numpy(items.inputs["item_ids"]),
                                             torch.from_numpy(items.inputs["item_dense"])).numpy()
                rows = {k: sum((first_row[u][k] for u in users), []) if isinstance(
                    first_row[users[0]][k], list) else np.concatenate([first_row[u][k]
                                                                       for u in users])
                        for k in first_row[users[0]]}
                x = _tower_inputs(rows, schema, user_schema, item_schema)
                user_vecs = model.user_tower(torch.from_numpy(x["seq"]),
                                             torch.from_numpy(x["user_dense"])).numpy()
            kmax = min(max(config.recall_ks), len(items.ids))
            scores = user_vecs @ item_vecs.T
            top = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
            ids = np.asarray(items.ids, dtype=object)
            retrieved = [list(ids[r]) for r in top]
            popular = [i for i, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
            rel = [relevant[u] for u in users]
            for k in config.recall_ks:
                metrics[f"recall@{k}"] = M.recall_at_k(rel, retrieved, k)
                metrics[f"popularity_recall@{k}"] = M.recall_at_k(rel, [popular] * len(rel), k)
        metrics = M.clean(metrics)
    exports = {
        "user_tower": ExportSpec(model.user_tower, ["seq", "user_dense"], ["user_embedding"],
                                 _concat_holdout(held_user, config.holdout_rows)),
        "item_tower": ExportSpec(model.item_tower, ["item_ids", "item_dense"],
                                 ["item_embedding"],
                                 _concat_holdout(held_item, config.holdout_rows)),
    }
    return TrainResult(kind="retrieval", model=model, schema=schema, metrics=metrics,
                       train_range=train_range, eval_range=eval_range, exports=exports,
                       tasks=list(f.positive_actions), history=history, catalog=items)
