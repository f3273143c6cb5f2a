"""Loading feature definitions: the example file loads, and each mistake gives its message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from features.errors import FeatureSpecError, FilterSyntaxError
from features.spec import DEFAULT_BLOCK_SIZES, FeatureSet
from features.spec_loader import load_features, parse_features, topic_fields
from features.timeutil import DAY, HOUR, MINUTE

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "features.yaml"


def feature(**overrides: Any) -> dict[str, Any]:
    base = {
        "name": "item_views",
        "source": "views",
        "entity": "item_id",
        "aggregation": "count",
        "windows": ["1h", "1d"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def load(*features: dict[str, Any], **top: Any) -> FeatureSet:
    return parse_features({"features": list(features), **top}, file="f.yaml")


def reason_of(*features: dict[str, Any], **top: Any) -> FeatureSpecError:
    with pytest.raises(FeatureSpecError) as info:
        load(*features, **top)
    return info.value


# ------------------------------------------------------------------------------------------
# The example file.


def test_example_file_loads() -> None:
    fs = load_features(EXAMPLE)
    assert fs.source_file == str(EXAMPLE)
    names = [f.name for f in fs.features]
    for expected in [
        "item_views",
        "item_impressions",
        "item_clicks",
        "item_likes",
        "item_hides",
        "item_dwell_mean",
        "item_unique_viewers",
        "item_dwell_p50",
        "user_views",
        "user_clicks",
        "user_recent_items",
        "user_topics_distinct",
        "author_views",
        "user_dwell_max",
        "item_dwell_sum",
        "item_dwell_min",
    ]:
        assert expected in names
    views = fs.get("item_views")
    assert views.windows == (HOUR, 6 * HOUR, DAY, 7 * DAY, 30 * DAY)
    assert views.block_sizes == (5 * MINUTE, HOUR, DAY)
    assert views.freshness == 15 * MINUTE
    clicks = fs.get("item_clicks")
    assert (clicks.source, clicks.filter) == ("engagements", "action == 'click'")
    assert fs.get("user_recent_items").params == {"n": 20}
    assert fs.get("item_unique_viewers").params == {"lg_k": 12}
    assert fs.get("item_dwell_p50").params == {"k": 200, "quantile": 0.5}
    assert fs.get("item_impressions").source == "impressions"
    assert [d.name for d in fs.derived] == ["item_ctr_1d", "item_ctr_7d"]
    ctr = fs.derived[0]
    assert ctr.entity_type == "item"
    assert ctr.inputs == ("item_clicks_1d", "item_impressions_1d")
    assert set(fs.sources) == {"views", "impressions", "engagements"}


def test_minimal_feature_gets_defaults() -> None:
    spec = load(feature()).features[0]
    assert spec.block_sizes == DEFAULT_BLOCK_SIZES
    assert spec.value is None and spec.filter is None and spec.params == {}
    assert spec.default == 0.0
    assert spec.window_names() == ["item_views_1h", "item_views_1d"]


def test_defaults_block_sizes_and_freshness_apply() -> None:
    fs = load(
        feature(windows=["10m"]),
        defaults={"block_sizes": ["10m", "2h"], "freshness": "5m"},
    )
    assert fs.features[0].block_sizes == (10 * MINUTE, 2 * HOUR)
    assert fs.features[0].freshness == 5 * MINUTE


def test_windows_keep_user_order() -> None:
    assert load(feature(windows=["1d", "1h"])).features[0].windows == (DAY, HOUR)


def test_topic_fields_reader() -> None:
    fields = topic_fields("views")
    assert fields["dwell_ms"] == "long"
    assert fields["request_id"] == "string?"
    assert topic_fields("engagements")["action"] == "enum"


# ------------------------------------------------------------------------------------------
# Each mistake: (features, top-level extras) -> the key part of the message.

MISTAKES: list[tuple[str, list[dict[str, Any]], dict[str, Any], str | None, str]] = [
    # id, features, top-level, feature named in the error, message part
    (
        "unknown key",
        [feature(stream=["1h"])],
        {},
        "item_views",
        (
            "unknown key 'stream' in a feature; allowed keys: aggregation, block_sizes, default, "
            "entity, filter, freshness, name, params, source, value, windows"
        ),
    ),
    (
        "unknown key did you mean",
        [feature(filtre="x")],
        {},
        "item_views",
        "unknown key 'filtre' in a feature (did you mean 'filter'?)",
    ),
    (
        "missing key",
        [feature(entity=None)],
        {},
        "item_views",
        "missing required key 'entity'; a feature needs name, source, entity, aggregation, windows",
    ),
    (
        "missing name",
        [feature(name=None)],
        {},
        None,
        "features[0] has no 'name'; add name: <lowercase_name>",
    ),
    (
        "bad name",
        [feature(name="Item-Views")],
        {},
        None,
        "bad feature name 'Item-Views': a name must match ^[a-z][a-z0-9_]{0,62}$",
    ),
    ("long name", [feature(name="a" * 64)], {}, None, "a name must match"),
    (
        "duplicate name",
        [feature(), feature()],
        {},
        "item_views",
        "duplicate name 'item_views': it is already used by feature 'item_views'; rename one",
    ),
    (
        "window value collides",
        [feature(name="item_views_1h", windows=["1d"]), feature()],
        {},
        "item_views",
        "duplicate name 'item_views_1h': it is already used by feature 'item_views_1h'",
    ),
    (
        "unknown source",
        [feature(source="veiws")],
        {},
        "item_views",
        (
            "unknown source topic 'veiws' (did you mean 'views'?); known topics: views, engagements, "
            "impressions, items"
        ),
    ),
    (
        "unknown entity",
        [feature(entity="itemid")],
        {},
        "item_views",
        (
            "unknown entity field 'itemid' for source 'views' (did you mean 'item_id'?); fields of "
            "views: event_id, event_ts, user_id, item_id"
        ),
    ),
    (
        "nullable entity",
        [feature(entity="request_id")],
        {},
        "item_views",
        (
            "entity field 'request_id' of 'views' is string?; an entity key must be a non-null "
            "string or integer field"
        ),
    ),
    (
        "unknown aggregation",
        [feature(aggregation="avg")],
        {},
        "item_views",
        (
            "unknown aggregation 'avg'; allowed: count, sum, mean, min, max, last_n, "
            "approx_distinct, approx_quantile"
        ),
    ),
    (
        "count with value",
        [feature(value="dwell_ms")],
        {},
        "item_views",
        "aggregation 'count' takes no value; remove 'value: dwell_ms' or use aggregation 'sum'",
    ),
    (
        "sum without value",
        [feature(aggregation="sum")],
        {},
        "item_views",
        "aggregation 'sum' needs a 'value' field to aggregate, e.g. value: dwell_ms",
    ),
    (
        "unknown value",
        [feature(aggregation="sum", value="dwell")],
        {},
        "item_views",
        "unknown value field 'dwell' for source 'views' (did you mean 'dwell_ms'?)",
    ),
    (
        "value wrong type",
        [feature(aggregation="mean", value="surface")],
        {},
        "item_views",
        (
            "aggregation 'mean' needs a numeric value field (long, int, double), but 'surface' is "
            "string; numeric fields of views: event_ts, dwell_ms, position"
        ),
    ),
    (
        "quantile wrong type",
        [feature(aggregation="approx_quantile", value="topic")],
        {},
        "item_views",
        "aggregation 'approx_quantile' needs a numeric value field",
    ),
    (
        "map value",
        [feature(source="impressions", aggregation="approx_distinct", value="scores")],
        {},
        "item_views",
        "value field 'scores' is map; aggregation 'approx_distinct' needs a scalar field",
    ),
    (
        "bad duration",
        [feature(windows=["1 hour"])],
        {},
        "item_views",
        "bad window '1 hour': expected a duration such as '5m', '1h' or '30d'",
    ),
    (
        "number window",
        [feature(windows=[60])],
        {},
        "item_views",
        "bad window 60 (a number needs a unit): write a duration such as '5m'",
    ),
    (
        "empty windows",
        [feature(windows=[])],
        {},
        "item_views",
        "windows is empty; list at least one window such as [1h, 1d]",
    ),
    (
        "windows not a list",
        [feature(windows="1h")],
        {},
        "item_views",
        "windows must be a list such as [1h, 1d, 7d], got '1h'",
    ),
    (
        "window not multiple",
        [feature(windows=["7m"])],
        {},
        "item_views",
        (
            "window '7m' is not a multiple of the streaming block size 5m; use a multiple such as "
            "5m or 10m"
        ),
    ),
    (
        "window below block",
        [feature(windows=["1m"])],
        {},
        "item_views",
        "window '1m' is not a multiple of the streaming block size 5m; use a multiple such as 5m",
    ),
    (
        "window too long",
        [feature(windows=["401d"])],
        {},
        "item_views",
        "window '401d' is longer than the limit 400d; use a shorter window",
    ),
    (
        "duplicate window",
        [feature(windows=["1d", "24h"])],
        {},
        "item_views",
        "window '24h' is listed twice (as 1d); remove one",
    ),
    (
        "blocks not ascending",
        [feature()],
        {"defaults": {"block_sizes": ["1h", "5m"]}},
        None,
        (
            "block_sizes ['1h', '5m'] are not ascending; block sizes must be ascending and each must "
            "divide the next, e.g. [5m, 1h, 1d]"
        ),
    ),
    (
        "blocks not dividing",
        [feature(block_sizes=["5m", "7m"])],
        {},
        "item_views",
        "block_sizes ['5m', '7m'] has 5m not dividing 7m; block sizes must be ascending",
    ),
    (
        "filter syntax",
        [feature(filter="len(surface) > 3")],
        {},
        "item_views",
        (
            "bad filter 'len(surface) > 3': function calls are not allowed in filters "
            "(at col 0: 'len(surface)')"
        ),
    ),
    (
        "filter unknown field",
        [feature(filter="surfce == 'explore'")],
        {},
        "item_views",
        (
            "filter \"surfce == 'explore'\" references unknown fields of 'views': surfce "
            "(did you mean 'surface'?); fields of views: event_id"
        ),
    ),
    (
        "filter enum typo",
        [feature(source="engagements", filter="action == 'clik'")],
        {},
        "item_views",
        "'clik' is not a value of enum field 'action'; values: click, like, share, save, hide",
    ),
    (
        "filter type",
        [feature(filter="dwell_ms == 'long'")],
        {},
        "item_views",
        "compares a string with a number, so it is always false",
    ),
    (
        "params for count",
        [feature(params={"n": 3})],
        {},
        "item_views",
        "aggregation 'count' takes no params; remove 'params'",
    ),
    (
        "last_n without n",
        [feature(aggregation="last_n", value="item_id")],
        {},
        "item_views",
        "aggregation 'last_n' needs param 'n' (1..1000), e.g. params: {n: 10}",
    ),
    (
        "last_n n too big",
        [feature(aggregation="last_n", value="item_id", params={"n": 5000})],
        {},
        "item_views",
        "param 'n' of 'last_n' must be an integer in 1..1000, got 5000",
    ),
    (
        "lg_k range",
        [feature(aggregation="approx_distinct", value="user_id", params={"lg_k": 30})],
        {},
        "item_views",
        "param 'lg_k' of 'approx_distinct' must be an integer in 4..21, got 30",
    ),
    (
        "quantile range",
        [feature(aggregation="approx_quantile", value="dwell_ms", params={"quantile": 1.5})],
        {},
        "item_views",
        "param 'quantile' of 'approx_quantile' must be a number in 0..1, got 1.5",
    ),
    (
        "unknown param",
        [feature(aggregation="last_n", value="item_id", params={"n": 5, "size": 3})],
        {},
        "item_views",
        "unknown param 'size' for aggregation 'last_n'; allowed: n",
    ),
    (
        "bad default",
        [feature(default="zero")],
        {},
        "item_views",
        "default must be a number, got 'zero'",
    ),
    ("bad freshness", [feature(freshness="soon")], {}, "item_views", "bad freshness 'soon'"),
    (
        "feature not a mapping",
        ["item_views"],
        {},
        None,
        "features[0] must be a mapping with keys name, source, entity, aggregation, windows",
    ),
    (
        "unknown top-level key",
        [feature()],
        {"featurs": []},
        None,
        (
            "unknown key 'featurs' in the top level (did you mean 'features'?); allowed keys: "
            "deduplicate, defaults, derived, features"
        ),
    ),
    (
        "unknown defaults key",
        [feature()],
        {"defaults": {"window": "1h"}},
        None,
        "unknown key 'window' in 'defaults'; allowed keys: block_sizes, freshness",
    ),
]


@pytest.mark.parametrize(
    ("features", "top", "feature_name", "message"),
    [pytest.param(f, t, n, m, id=i) for i, f, t, n, m in MISTAKES],
)
def test_mistake_message(
    features: list[dict[str, Any]], top: dict[str, Any], feature_name: str | None, message: str
) -> None:
    err = reason_of(*features, **top)
    assert message in err.reason
    assert err.file == "f.yaml"
    assert err.feature == feature_name
    assert str(err).startswith("f.yaml: ")


def test_filter_errors_are_filter_syntax_errors() -> None:
    err = reason_of(feature(filter="x.y == 1"))
    assert isinstance(err, FilterSyntaxError)
    assert str(err) == (
        "f.yaml: feature 'item_views': bad filter 'x.y == 1': attribute access is not "
        "allowed (at col 0: 'x.y')"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "expected a mapping with a 'features' list at the top level, got an empty file"),
        ([1, 2], "expected a mapping with a 'features' list at the top level, got a list"),
        ({}, "missing the 'features' list; add 'features:' with at least one feature"),
        ({"features": []}, "'features' must be a non-empty list of feature mappings"),
        ({"features": {"name": "x"}}, "'features' must be a non-empty list"),
    ],
)
def test_top_level_shape(data: Any, message: str) -> None:
    with pytest.raises(FeatureSpecError) as info:
        parse_features(data, file="f.yaml")
    assert message in info.value.reason


# ------------------------------------------------------------------------------------------
# Derived features.

CLICKS = feature(name="item_clicks", source="engagements", filter="action == 'click'")
IMPRESSIONS = feature(name="item_impressions", source="impressions")
USER_VIEWS = feature(name="user_views", entity="user_id")
RECENT = feature(
    name="user_recent",
    entity="user_id",
    aggregation="last_n",
    value="item_id",
    params={"n": 5},
    windows=["1d"],
)


def derived(**overrides: Any) -> dict[str, Any]:
    base = {
        "name": "item_ctr_1d",
        "entity": "item",
        "expression": "(item_clicks_1d + 1) / (item_impressions_1d + 20)",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_derived_loads() -> None:
    fs = load(
        CLICKS,
        IMPRESSIONS,
        derived=[
            derived(default=0.05),
            derived(name="ctr_log", entity="item_id", expression="log1p(item_ctr_1d)"),
        ],
    )
    ctr, log = fs.derived
    assert ctr.inputs == ("item_clicks_1d", "item_impressions_1d")
    assert ctr.default == 0.05
    assert (log.entity_type, log.inputs) == ("item", ("item_ctr_1d",))


DERIVED_MISTAKES = [
    (
        "unknown input",
        [derived(expression="item_clicks_2d / item_impressions_1d")],
        (
            "expression 'item_clicks_2d / item_impressions_1d' references unknown inputs: "
            "item_clicks_2d (did you mean 'item_clicks_1d'?)"
        ),
    ),
    (
        "mixed entities",
        [derived(expression="item_clicks_1d / user_views_1d")],
        (
            "expression 'item_clicks_1d / user_views_1d' mixes entity types: 'user_views_1d' is a "
            "user feature, but this derived feature's entity is 'item'"
        ),
    ),
    (
        "unknown entity",
        [derived(entity="itme")],
        "unknown entity 'itme'; entity types with features: item, user",
    ),
    (
        "defined later",
        [derived(name="a", expression="b * 2"), derived(name="b", expression="item_clicks_1d")],
        "references unknown inputs: b; 'b' is defined later in 'derived', move it above",
    ),
    (
        "collides with window value",
        [derived(name="item_clicks_1d")],
        (
            "duplicate name 'item_clicks_1d': it is already used by the 1d window of feature "
            "'item_clicks'"
        ),
    ),
    (
        "syntax",
        [derived(expression="item_clicks_1d > 3")],
        "bad expression 'item_clicks_1d > 3': comparisons are not allowed in derived expressions",
    ),
    (
        "unknown function",
        [derived(expression="exp(item_clicks_1d)")],
        "unknown function 'exp'; allowed: log1p, max, min, sqrt",
    ),
    (
        "last_n input",
        [derived(entity="user", expression="user_recent_1d + 1")],
        "'user_recent_1d' is a last_n list, not a number",
    ),
    (
        "missing expression",
        [derived(expression=None)],
        "missing required key 'expression'; a derived feature needs name, entity, expression",
    ),
    (
        "unknown key",
        [derived(expr="x")],
        "unknown key 'expr' in a derived feature; allowed keys: default, entity, expression, name",
    ),
]


@pytest.mark.parametrize(
    ("items", "message"), [pytest.param(d, m, id=i) for i, d, m in DERIVED_MISTAKES]
)
def test_derived_mistake_message(items: list[dict[str, Any]], message: str) -> None:
    err = reason_of(CLICKS, IMPRESSIONS, USER_VIEWS, RECENT, derived=items)
    assert message in err.reason


# ------------------------------------------------------------------------------------------
# Files.


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("features:\n  - name: x\n    windows: [1h\n")
    with pytest.raises(FeatureSpecError) as info:
        load_features(path)
    assert info.value.file == str(path)
    assert "invalid YAML at line" in info.value.reason


def test_duplicate_yaml_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "features:\n  - name: item_views\n    source: views\n    entity: item_id\n"
        "    aggregation: count\n    windows: [1h]\n    windows: [1d]\n"
    )
    with pytest.raises(FeatureSpecError, match="duplicate key 'windows' \\(first at line 6\\)"):
        load_features(path)


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("features: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(FeatureSpecError, match="invalid YAML"):
        load_features(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureSpecError, match="file not found"):
        load_features(tmp_path / "nope.yaml")


def test_injected_schemas() -> None:
    schemas = {"clicks": {"item_id": "string", "value": "double"}}
    fs = parse_features(
        {"features": [feature(source="clicks", aggregation="sum", value="value")]},
        schemas=schemas,
    )
    assert fs.features[0].source == "clicks"
    with pytest.raises(FeatureSpecError, match="known topics: clicks"):
        parse_features({"features": [feature()]}, schemas=schemas)


def test_version_changes_with_filter_not_windows() -> None:
    a = load(feature()).features[0]
    b = load(feature(windows=["1h", "1d", "7d"])).features[0]
    c = load(feature(filter="dwell_ms > 0")).features[0]
    assert a.version == b.version != c.version


# ------------------------------------------------------------------------------------------
# The command line.


def test_cli_validate_example() -> None:
    from tessera.commands.features import features

    result = CliRunner().invoke(features, ["validate", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "item_views" in result.output and "1h,6h,1d,7d,30d" in result.output
    spec = load_features(EXAMPLE).get("item_views")
    assert spec.version in result.output


def test_cli_validate_error_exits_2(tmp_path: Path) -> None:
    from tessera.commands.features import features

    path = tmp_path / "bad.yaml"
    path.write_text(
        "features:\n  - name: x\n    source: views\n    entity: item_id\n"
        "    aggregation: count\n    windows: [7m]\n"
    )
    result = CliRunner().invoke(features, ["validate", str(path)])
    assert result.exit_code == 2
    assert "window '7m' is not a multiple of the streaming block size 5m" in result.output


def test_cli_list() -> None:
    from tessera.commands.features import features

    result = CliRunner().invoke(features, ["list", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "item_views_30d\titem\tcount\tviews" in lines
    assert any(line.startswith("item_ctr_1d\titem\tderived\t") for line in lines)


def test_features_get_names_the_known_entity_types_for_an_unknown_one(tmp_path) -> None:
    """``tessera features get --entity movie`` is a usage error (exit 2) listing the types
    the features file defines, not an empty answer with exit 0."""
    from features.store import open_store
    from tessera.commands.features import features

    open_store(f"lmdb://{tmp_path}/store").close()
    result = CliRunner().invoke(features, ["get", "--entity", "movie", "--ids", "m1",
                                  "--store", f"lmdb://{tmp_path}/store",
                                  "--features", str(EXAMPLE)])
    assert result.exit_code == 2, result.output
    assert "unknown entity type 'movie'" in result.output
    assert "author, item, user" in result.output


# -- declared sources ------------------------------------------------------------------------

_SOURCE_FEATURE = {"name": "item_ratings", "source": "ratings", "entity": "item_id",
                   "aggregation": "count", "windows": ["1d"]}


def _with_source(**source) -> dict:
    decl = {"name": "ratings", "fields": {"user_id": "string", "item_id": "string",
                                          "rating": "double"}, **source}
    return {"sources": [decl], "features": [dict(_SOURCE_FEATURE)]}


def test_a_declared_source_is_registered_and_aggregated() -> None:
    from schemas.codec import encode
    from schemas.columnar import decode_message, records_to_columns
    from schemas.registry import event_topics, topic_schema

    fs = parse_features({**_with_source(event_time={"field": "ts", "unit": "s"}),
                         "features": [dict(_SOURCE_FEATURE),
                                      {"name": "item_rating_mean", "source": "ratings",
                                       "entity": "item_id", "aggregation": "mean",
                                       "value": "rating", "windows": ["1d"]}]})
    decl = fs.declared_source("ratings")
    assert decl is not None and (decl.time_column, decl.time_unit) == ("ts", "s")
    assert "ratings" in event_topics()
    schema = topic_schema("ratings")
    assert schema.field_names == ("event_id", "event_ts", "user_id", "item_id", "rating")
    assert schema.schema_id >= 1000
    record = {"event_id": "e1", "event_ts": 5, "user_id": "u", "item_id": "i", "rating": 4.5}
    cols = decode_message(encode("ratings", record), topic="ratings")
    assert cols.n == 1 and list(cols.columns["rating"]) == [4.5]
    assert records_to_columns("ratings", [record]).n == 1


@pytest.mark.parametrize(("source", "message"), [
    ({"name": "views"}, "'views' is a built-in topic"),
    ({"fields": {"rating": "decimal"}}, "field 'rating' has type 'decimal'"),
    ({"fields": {"event_ts": "long"}}, "field 'event_ts' is part of every event record"),
    ({"event_time": {"field": "ts", "unit": "minutes"}}, "event_time.unit must be one of"),
    ({"fields": {}}, "'fields' must be a mapping"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_declared_source_errors(source: dict, message: str) -> None:
    with pytest.raises(FeatureSpecError, match=message):
        parse_features(_with_source(**source))


def test_a_declared_source_from_an_avsc_file(tmp_path: Path) -> None:
    import json

    from schemas.registry import topic_schema

    (tmp_path / "plays.avsc").write_text(json.dumps({
        "type": "record", "name": "plays", "fields": [
            {"name": "event_id", "type": "string"}, {"name": "event_ts", "type": "long"},
            {"name": "user_id", "type": "string"}, {"name": "track_id", "type": "string"},
            {"name": "seconds", "type": "double"},
            {"name": "device", "type": ["null", "string"], "default": None}]}))
    (tmp_path / "features.yaml").write_text(
        "sources:\n  - {name: plays, schema: plays.avsc}\n"
        "features:\n  - {name: track_plays, source: plays, entity: track_id,"
        " aggregation: count, windows: [1d]}\n")
    fs = load_features(tmp_path / "features.yaml")
    assert dict(fs.declared_source("plays").fields) == {
        "user_id": "string", "track_id": "string", "seconds": "double", "device": "string?"}
    assert topic_schema("plays").field("device").nullable
    (tmp_path / "bad.avsc").write_text(json.dumps({
        "type": "record", "name": "bad", "fields": [{"name": "ok", "type": "boolean"}]}))
    (tmp_path / "bad.yaml").write_text(
        "sources:\n  - {name: bad, schema: bad.avsc}\n"
        "features:\n  - {name: x, source: views, entity: item_id, aggregation: count,"
        " windows: [1d]}\n")
    with pytest.raises(FeatureSpecError, match="field 'ok' has type 'boolean'"):
        load_features(tmp_path / "bad.yaml")


def test_deduplicate_maps_topics_to_horizons_and_names_its_mistakes() -> None:
    fs = load(feature(), deduplicate={"views": "10m", "engagements": "1h"})
    assert fs.deduplicate == {"views": 10 * MINUTE, "engagements": HOUR}
    assert load(feature()).deduplicate == {}
    assert "unknown topic 'veiws'" in str(reason_of(feature(), deduplicate={"veiws": "10m"}))
    assert "did you mean 'views'" in str(reason_of(feature(), deduplicate={"veiws": "10m"}))
    assert "a number needs a unit" in str(reason_of(feature(), deduplicate={"views": 600}))
    assert "must be a mapping of topic to horizon" in str(
        reason_of(feature(), deduplicate=["views"]))
    assert load_features(EXAMPLE).deduplicate  # the shipped file deduplicates its topics
