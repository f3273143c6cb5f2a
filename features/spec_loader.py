"""Load and validate feature definitions from YAML into a ``FeatureSet``.

The file is data only: it is read with a ``yaml.SafeLoader`` (no tags, no code) that also
rejects duplicate keys. Every mistake raises ``FeatureSpecError`` naming the file, the
feature, the reason and a fix, e.g.::

    features.yaml: feature 'item_views': window '7m' is not a multiple of the streaming block
    size 5m; use a multiple such as 5m or 10m

See ``features.yaml`` at the repository root for a commented example of the format.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from features.errors import DurationError, FeatureSpecError, FilterSyntaxError
from features.expressions import check_fields, check_types, parse_derived, parse_filter
from features.spec import (
    AGGREGATION_KINDS,
    DEFAULT_BLOCK_SIZES,
    DerivedFeatureSpec,
    FeatureSet,
    FeatureSpec,
    SourceSpec,
)
from features.timeutil import DAY, MINUTE, format_duration, parse_duration

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_WINDOW = 400 * DAY
DEFAULT_FRESHNESS = 15 * MINUTE

TOP_LEVEL_KEYS = ("sources", "defaults", "deduplicate", "features", "derived")
SOURCE_KEYS = ("name", "fields", "schema", "event_time", "event_id")
EVENT_TIME_KEYS = ("field", "unit")
TIME_UNITS = ("ms", "s", "us", "iso")
DEFAULTS_KEYS = ("block_sizes", "freshness")
FEATURE_REQUIRED = ("name", "source", "entity", "aggregation", "windows")
FEATURE_KEYS = (
    *FEATURE_REQUIRED,
    "value",
    "filter",
    "params",
    "freshness",
    "default",
    "block_sizes",
)
DERIVED_REQUIRED = ("name", "entity", "expression")
DERIVED_KEYS = (*DERIVED_REQUIRED, "default")

NUMERIC_TYPES = ("long", "int", "double", "float")
SCALAR_TYPES = (*NUMERIC_TYPES, "string", "enum", "boolean")
NUMERIC_AGGREGATIONS = ("sum", "mean", "min", "max", "approx_quantile")
ENTITY_TYPES = ("string", "long", "int")

# aggregation -> {param: (kind, low, high, default or None when required)}
PARAMS: dict[str, dict[str, tuple[type, float, float, float | None]]] = {
    "last_n": {"n": (int, 1, 1000, None)},
    "approx_distinct": {"lg_k": (int, 4, 21, 12)},
    "approx_quantile": {"k": (int, 8, 65535, 200), "quantile": (float, 0.0, 1.0, 0.5)},
}

_NON_EVENT_SCHEMAS = {"deadletter", "event_batch"}
_AVRO_DIR = Path(__file__).resolve().parent.parent / "schemas" / "avro"

Schemas = Mapping[str, Mapping[str, str]]
"""topic -> (field name -> simple type: ``string``, ``long``, ``enum``, ``string?``...)."""


# --------------------------------------------------------------------------------------------
# Topic schemas: schemas.registry when present, otherwise a small reader of the .avsc files.


def _avsc_type(t: Any) -> str:
    if isinstance(t, list):
        branches = [b for b in t if b != "null"]
        inner = _avsc_type(branches[0]) if len(branches) == 1 else "union"
        return f"{inner}?" if "null" in t else inner
    if isinstance(t, dict):
        return str(t.get("type"))
    return str(t)


@cache
def _read_avsc(topic: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    raw = json.loads((_AVRO_DIR / f"{topic}.avsc").read_text("utf-8"))
    types: dict[str, str] = {}
    enums: dict[str, tuple[str, ...]] = {}
    for f in raw["fields"]:
        types[f["name"]] = _avsc_type(f["type"])
        if isinstance(f["type"], dict) and f["type"].get("type") == "enum":
            enums[f["name"]] = tuple(f["type"]["symbols"])
    return types, enums


def _known_topics() -> tuple[str, ...]:
    try:
        from schemas.registry import TOPICS
    except ImportError:
        return tuple(
            sorted(p.stem for p in _AVRO_DIR.glob("*.avsc") if p.stem not in _NON_EVENT_SCHEMAS)
        )
    return tuple(TOPICS)  # declared sources are added by the file that declares them


def topic_fields(topic: str) -> dict[str, str]:
    """Map each field of ``topic`` to its simple type (``schemas.registry`` when importable)."""
    try:
        from schemas.registry import topic_fields as registry_topic_fields
    except ImportError:
        return dict(_read_avsc(topic)[0])
    return registry_topic_fields(topic)


def default_schemas() -> dict[str, dict[str, str]]:
    """Return the field types of every event topic, from the Avro schemas in ``schemas/avro``."""
    return {t: topic_fields(t) for t in _known_topics()}


def _default_enums() -> dict[str, dict[str, tuple[str, ...]]]:
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for topic in _known_topics():
        path = _AVRO_DIR / f"{topic}.avsc"
        out[topic] = dict(_read_avsc(topic)[1]) if path.exists() else {}
    return out


# --------------------------------------------------------------------------------------------
# YAML reading.


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate mapping keys instead of keeping the last."""


def _construct_mapping(loader: _StrictSafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictSafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def load_features(path: str | Path, *, schemas: Schemas | None = None) -> FeatureSet:
    """Read, parse and validate the feature definitions in the YAML file at ``path``.

    Args:
        path: the YAML file.
        schemas: topic -> field types; defaults to the Avro schemas of the event topics.

    Raises:
        FeatureSpecError: the file is missing, is not valid YAML, or defines invalid features.
    """
    file = str(path)
    try:
        text = Path(path).read_text("utf-8")
    except FileNotFoundError as exc:
        raise FeatureSpecError(
            "file not found; run `tessera init` to write a starter features.yaml here, or "
            "pass the path of your feature definition file",
            file=file,
        ) from exc
    except OSError as exc:
        raise FeatureSpecError(f"cannot read the file: {exc.strerror}", file=file) from exc
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader subclass: no tags, no code
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FeatureSpecError(f"invalid YAML{where}: {problem}", file=file) from exc
    return parse_features(data, file=file, schemas=schemas)


def parse_features(
    data: Any, *, file: str = "<string>", schemas: Schemas | None = None
) -> FeatureSet:
    """Validate already-loaded YAML data (a mapping) and build a ``FeatureSet``.

    Args:
        data: the mapping with ``features`` and optional ``defaults`` and ``derived``.
        file: the name used in error messages.
        schemas: topic -> field types; defaults to the Avro schemas of the event topics.

    Raises:
        FeatureSpecError: the first mistake found, naming file, feature, reason and fix.
    """
    if schemas is None:
        schemas, enums = default_schemas(), _default_enums()
    else:
        enums = {}
    return _Loader(file, schemas, enums).load(data)


# --------------------------------------------------------------------------------------------
# Validation.


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(names)


class _Loader:
    def __init__(self, file: str, schemas: Schemas, enums: Mapping[str, Mapping[str, Any]]):
        self.file = file
        self.schemas = schemas
        self.enums = enums
        # every readable name -> what owns it, for collision messages
        self.names: dict[str, str] = {}
        self.declared_names: set[str] = set()

    def error(self, reason: str, feature: str | None = None) -> FeatureSpecError:
        return FeatureSpecError(reason, file=self.file, feature=feature)

    # -- top level

    def load(self, data: Any) -> FeatureSet:
        if not isinstance(data, dict):
            got = "an empty file" if data is None else f"a {type(data).__name__}"
            raise self.error(
                f"expected a mapping with a 'features' list at the top level, got {got}; "
                "start the file with 'features:'"
            )
        self.check_keys(data, TOP_LEVEL_KEYS, where="the top level")
        if "features" not in data:
            raise self.error(
                "missing the 'features' list; add 'features:' with at least one feature"
            )
        items = data["features"]
        if not isinstance(items, list) or not items:
            raise self.error(
                "'features' must be a non-empty list of feature mappings (each item starts "
                "with '- name: ...')"
            )
        declared = self.sources(data.get("sources"))
        defaults = self.defaults(data.get("defaults"))
        features = tuple(self.feature(i, item, defaults) for i, item in enumerate(items))
        derived_items = data.get("derived") or []
        if not isinstance(derived_items, list):
            raise self.error("'derived' must be a list of derived feature mappings")
        derived: list[DerivedFeatureSpec] = []
        for i in range(len(derived_items)):
            derived.append(self.derived(i, derived_items, features, derived))
        return FeatureSet(features=features, derived=tuple(derived), source_file=self.file,
                          declared=declared,
                          deduplicate=self.deduplicate(data.get("deduplicate")))

    def deduplicate(self, raw: Any) -> dict[str, int]:
        """Validate ``deduplicate:``, a mapping of topic to horizon (``{views: 10m}``)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.error("'deduplicate' must be a mapping of topic to horizon, such as "
                             "{views: 10m, engagements: 10m}")
        out: dict[str, int] = {}
        for topic, horizon in raw.items():
            if topic not in self.schemas:
                raise self.error(
                    f"deduplicate: unknown topic {topic!r}"
                    f"{_did_you_mean(str(topic), list(self.schemas))}; topics: "
                    f"{_quoted(sorted(self.schemas))}")
            ms = self.duration(horizon, f"deduplicate horizon of {topic!r}", None)
            if ms <= 0:
                raise self.error(f"deduplicate: the horizon of {topic!r} must be positive")
            out[str(topic)] = ms
        return out

    def check_keys(
        self,
        item: Mapping[str, Any],
        allowed: Sequence[str],
        *,
        where: str,
        feature: str | None = None,
    ) -> None:
        for key in item:
            if key not in allowed:
                raise self.error(
                    f"unknown key {key!r} in {where}{_did_you_mean(str(key), allowed)}; "
                    f"allowed keys: {_quoted(sorted(allowed))}",
                    feature,
                )

    def sources(self, raw: Any) -> tuple[SourceSpec, ...]:
        """Validate ``sources:``, register each with ``schemas.registry`` (this process) and
        make its fields known to the features below."""
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.error("'sources' must be a list of source mappings (each starts with "
                             "'- name: ...')")
        out: list[SourceSpec] = []
        for i, item in enumerate(raw):
            where = f"source #{i + 1}"
            if not isinstance(item, dict):
                raise self.error(f"{where} must be a mapping with name, fields and event_time")
            self.check_keys(item, SOURCE_KEYS, where=where)
            name = self.name(item.get("name"), None, "source")
            where = f"source {name!r}"
            if name in self.schemas and name not in self.declared_names:
                raise self.error(f"{where}: {name!r} is a built-in topic; its fields are "
                                 f"{_quoted(list(self.schemas[name]))}; pick another name")
            if name in self.declared_names:
                raise self.error(f"{where} is declared twice")
            if "schema" in item:
                if "fields" in item:
                    raise self.error(f"{where}: give 'fields' or 'schema' (an .avsc file), "
                                     "not both")
                fields = self.avsc_fields(item["schema"], where)
            else:
                fields = item.get("fields")
            if not isinstance(fields, dict) or not fields:
                raise self.error(f"{where}: 'fields' must be a mapping of field name to type, "
                                 "such as {user_id: string, rating: double}")
            for fname in fields:
                self.name(fname, None, f"{where} field")
            time = item.get("event_time") or {}
            if not isinstance(time, dict):
                raise self.error(f"{where}: 'event_time' must be a mapping such as "
                                 "{field: ts, unit: s}")
            self.check_keys(time, EVENT_TIME_KEYS, where=f"{where} event_time")
            column = time.get("field", "event_ts")
            unit = time.get("unit", "ms")
            if not isinstance(column, str) or not column:
                raise self.error(f"{where}: event_time.field must name a column")
            if unit not in TIME_UNITS:
                raise self.error(f"{where}: event_time.unit must be one of "
                                 f"{_quoted(list(TIME_UNITS))}, got {unit!r}")
            id_column = item.get("event_id")
            if id_column is not None and (not isinstance(id_column, str) or not id_column):
                raise self.error(f"{where}: 'event_id' must name the column of event ids")
            from schemas.errors import SchemaError
            from schemas.registry import register_source

            try:
                schema = register_source(name, {str(k): v for k, v in fields.items()})
            except SchemaError as exc:
                raise self.error(str(exc)) from None
            self.schemas = {**self.schemas,
                            name: {f.name: f.type_name for f in schema.fields}}
            self.declared_names.add(name)
            out.append(SourceSpec(name=name, fields=dict(fields), time_column=column,
                                  time_unit=unit, id_column=id_column))
        return tuple(out)

    def avsc_fields(self, raw: Any, where: str) -> dict[str, str]:
        """The fields of an Avro record schema file (relative to the features file), as
        declared-source types; ``event_id``/``event_ts`` are left out (every record has them)."""
        if not isinstance(raw, str) or not raw:
            raise self.error(f"{where}: 'schema' must be the path of an .avsc file")
        path = Path(raw)
        if not path.is_absolute() and self.file not in ("<string>", ""):
            path = Path(self.file).parent / path
        try:
            doc = json.loads(path.read_text("utf-8"))
        except OSError as exc:
            raise self.error(f"{where}: cannot read schema {str(path)!r}: {exc.strerror}") \
                from None
        except json.JSONDecodeError as exc:
            raise self.error(f"{where}: schema {str(path)!r} is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("type") != "record" or \
                not isinstance(doc.get("fields"), list):
            raise self.error(f"{where}: schema {str(path)!r} must be an Avro record "
                             "({\"type\": \"record\", \"fields\": [...]})")
        out: dict[str, str] = {}
        for f in doc["fields"]:
            name, typ = (f.get("name"), f.get("type")) if isinstance(f, dict) else (None, None)
            if name in ("event_id", "event_ts"):
                continue
            if isinstance(typ, list) and len(typ) == 2 and "null" in typ and "string" in typ:
                typ = "string?"
            if not isinstance(name, str) or not isinstance(typ, str):
                raise self.error(f"{where}: schema field {f!r} is not a flat field; declared "
                                 "sources take string, string?, long, int and double fields")
            out[name] = typ
        return out

    def defaults(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {"block_sizes": DEFAULT_BLOCK_SIZES, "freshness": DEFAULT_FRESHNESS}
        if not isinstance(raw, dict):
            raise self.error("'defaults' must be a mapping such as {block_sizes: [5m, 1h, 1d]}")
        self.check_keys(raw, DEFAULTS_KEYS, where="'defaults'")
        out: dict[str, Any] = {"block_sizes": DEFAULT_BLOCK_SIZES, "freshness": DEFAULT_FRESHNESS}
        if "block_sizes" in raw:
            out["block_sizes"] = self.block_sizes(raw["block_sizes"], None, where="defaults")
        if "freshness" in raw:
            out["freshness"] = self.duration(raw["freshness"], "freshness", None)
        return out

    # -- small validators

    def name(self, raw: Any, feature: str | None, what: str) -> str:
        if not isinstance(raw, str) or not NAME_PATTERN.match(raw):
            raise self.error(
                f"bad {what} name {raw!r}: a name must match ^[a-z][a-z0-9_]{{0,62}}$ "
                "(lowercase letters, digits and '_', starting with a letter, at most 63 "
                "characters), e.g. item_views",
                feature,
            )
        return raw

    def claim(self, name: str, owner: str, feature: str) -> None:
        if name in self.names:
            raise self.error(
                f"duplicate name {name!r}: it is already used by {self.names[name]}; "
                "rename one of them",
                feature,
            )
        self.names[name] = owner

    def duration(self, raw: Any, what: str, feature: str | None) -> int:
        if isinstance(raw, bool) or not isinstance(raw, str):
            hint = " (a number needs a unit)" if isinstance(raw, (int, float)) else ""
            raise self.error(
                f"bad {what} {raw!r}{hint}: write a duration such as '5m', '1h' or '30d' "
                "(units: ms, s, m, h, d, w)",
                feature,
            )
        try:
            return parse_duration(raw)
        except DurationError as exc:
            raise self.error(f"bad {what} {raw!r}: {exc}", feature) from exc

    def block_sizes(self, raw: Any, feature: str | None, *, where: str) -> tuple[int, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.error(
                f"block_sizes in {where} must be a non-empty list such as [5m, 1h, 1d]", feature
            )
        sizes = tuple(self.duration(x, "block size", feature) for x in raw)
        for small, big in itertools.pairwise(sizes):
            if big <= small or big % small:
                problem = (
                    "are not ascending"
                    if big <= small
                    else f"has {format_duration(small)} not dividing {format_duration(big)}"
                )
                raise self.error(
                    f"block_sizes {[format_duration(s) for s in sizes]} {problem}; block sizes "
                    "must be ascending and each must divide the next, e.g. [5m, 1h, 1d]",
                    feature,
                )
        return sizes

    # -- one feature

    def feature(self, index: int, item: Any, defaults: Mapping[str, Any]) -> FeatureSpec:
        label = f"features[{index}]"
        if not isinstance(item, dict):
            raise self.error(
                f"{label} must be a mapping with keys {_quoted(FEATURE_REQUIRED)}, got "
                f"{type(item).__name__} {item!r}"
            )
        if "name" not in item:
            raise self.error(f"{label} has no 'name'; add name: <lowercase_name>")
        name = self.name(item["name"], None, "feature")
        self.check_keys(item, FEATURE_KEYS, where="a feature", feature=name)
        for key in FEATURE_REQUIRED:
            if key not in item:
                raise self.error(
                    f"missing required key {key!r}; a feature needs {_quoted(FEATURE_REQUIRED)}",
                    name,
                )
        self.claim(name, f"feature {name!r}", name)

        source = item["source"]
        topics = tuple(self.schemas)
        if source not in self.schemas:
            raise self.error(
                f"unknown source topic {source!r}{_did_you_mean(str(source), topics)}; "
                f"known topics: {_quoted(topics)}",
                name,
            )
        fields = self.schemas[source]

        entity = item["entity"]
        if entity not in fields:
            raise self.error(
                f"unknown entity field {entity!r} for source {source!r}"
                f"{_did_you_mean(str(entity), list(fields))}; fields of {source}: "
                f"{_quoted(list(fields))}",
                name,
            )
        if fields[entity] not in ENTITY_TYPES:
            raise self.error(
                f"entity field {entity!r} of {source!r} is {fields[entity]}; an entity key must "
                "be a non-null string or integer field such as item_id",
                name,
            )

        aggregation = item["aggregation"]
        if aggregation not in AGGREGATION_KINDS:
            raise self.error(
                f"unknown aggregation {aggregation!r}"
                f"{_did_you_mean(str(aggregation), AGGREGATION_KINDS)}; allowed: "
                f"{_quoted(AGGREGATION_KINDS)}",
                name,
            )
        value = self.value(item, aggregation, source, fields, name)
        block_sizes = (
            self.block_sizes(item["block_sizes"], name, where="the feature")
            if "block_sizes" in item
            else tuple(defaults["block_sizes"])
        )
        windows = self.windows(item["windows"], block_sizes, name)
        filter_text = self.filter(item.get("filter"), source, fields, name)
        params = self.params(item.get("params"), aggregation, name)
        freshness = (
            self.duration(item["freshness"], "freshness", name)
            if "freshness" in item
            else defaults["freshness"]
        )
        default = self.number(item.get("default", 0.0), "default", name)

        spec = FeatureSpec(
            name=name,
            source=source,
            entity=entity,
            aggregation=aggregation,
            value=value,
            windows=windows,
            filter=filter_text,
            block_sizes=block_sizes,
            params=params,
            freshness=freshness,
            default=default,
        )
        for w, wname in zip(spec.windows, spec.window_names()):
            self.claim(wname, f"the {format_duration(w)} window of feature {name!r}", name)
        return spec

    def value(
        self,
        item: Mapping[str, Any],
        aggregation: str,
        source: str,
        fields: Mapping[str, str],
        name: str,
    ) -> str | None:
        value = item.get("value")
        if aggregation == "count":
            if value is not None:
                raise self.error(
                    f"aggregation 'count' takes no value; remove 'value: {value}' or use "
                    "aggregation 'sum'",
                    name,
                )
            return None
        if value is None:
            raise self.error(
                f"aggregation {aggregation!r} needs a 'value' field to aggregate, e.g. "
                "value: dwell_ms",
                name,
            )
        if value not in fields:
            raise self.error(
                f"unknown value field {value!r} for source {source!r}"
                f"{_did_you_mean(str(value), list(fields))}; fields of {source}: "
                f"{_quoted(list(fields))}",
                name,
            )
        ftype = fields[value].rstrip("?")
        if aggregation in NUMERIC_AGGREGATIONS and ftype not in NUMERIC_TYPES:
            numeric = [f for f, t in fields.items() if t.rstrip("?") in NUMERIC_TYPES]
            raise self.error(
                f"aggregation {aggregation!r} needs a numeric value field (long, int, double), "
                f"but {value!r} is {fields[value]}; numeric fields of {source}: "
                f"{_quoted(numeric)}",
                name,
            )
        if ftype not in SCALAR_TYPES:
            raise self.error(
                f"value field {value!r} is {fields[value]}; aggregation {aggregation!r} needs a "
                "scalar field (string, enum or number)",
                name,
            )
        return value

    def windows(self, raw: Any, block_sizes: tuple[int, ...], name: str) -> tuple[int, ...]:
        if not isinstance(raw, list):
            raise self.error(f"windows must be a list such as [1h, 1d, 7d], got {raw!r}", name)
        if not raw:
            raise self.error("windows is empty; list at least one window such as [1h, 1d]", name)
        block = block_sizes[0]
        out: list[int] = []
        for text in raw:
            w = self.duration(text, "window", name)
            if w % block:
                lower = (w // block) * block
                near = [x for x in (lower, lower + block) if x > 0]
                raise self.error(
                    f"window {text!r} is not a multiple of the streaming block size "
                    f"{format_duration(block)}; use a multiple such as "
                    f"{' or '.join(format_duration(x) for x in near)}",
                    name,
                )
            if w > MAX_WINDOW:
                raise self.error(
                    f"window {text!r} is longer than the limit {format_duration(MAX_WINDOW)}; "
                    "use a shorter window",
                    name,
                )
            if w in out:
                raise self.error(
                    f"window {text!r} is listed twice (as {format_duration(w)}); remove one",
                    name,
                )
            out.append(w)
        return tuple(out)

    def filter(self, raw: Any, source: str, fields: Mapping[str, str], name: str) -> str | None:
        if raw is None:
            return None
        try:
            expr = parse_filter(raw)
        except FilterSyntaxError as exc:
            raise FilterSyntaxError(
                f"bad filter {raw!r}: {exc.reason}", file=self.file, feature=name
            ) from exc
        unknown = check_fields(expr, fields)
        if unknown:
            hints = "".join(_did_you_mean(u, list(fields)) for u in unknown[:1])
            raise FilterSyntaxError(
                f"filter {raw!r} references unknown fields of {source!r}: "
                f"{_quoted(unknown)}{hints}; fields of {source}: {_quoted(list(fields))}",
                file=self.file,
                feature=name,
            )
        problems = check_types(expr, fields, enums=self.enums.get(source, {}))
        if problems:
            raise FilterSyntaxError(
                f"bad filter {raw!r}: {'; '.join(problems)}", file=self.file, feature=name
            )
        return raw

    def params(self, raw: Any, aggregation: str, name: str) -> dict[str, float]:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.error(f"params must be a mapping such as {{n: 10}}, got {raw!r}", name)
        spec = PARAMS.get(aggregation, {})
        if not spec and raw:
            raise self.error(f"aggregation {aggregation!r} takes no params; remove 'params'", name)
        for key in raw:
            if key not in spec:
                raise self.error(
                    f"unknown param {key!r} for aggregation {aggregation!r}; allowed: "
                    f"{_quoted(sorted(spec))}",
                    name,
                )
        out: dict[str, float] = {}
        for key, (kind, low, high, default) in spec.items():
            if key not in raw:
                if default is None:
                    raise self.error(
                        f"aggregation {aggregation!r} needs param {key!r} "
                        f"({low:g}..{high:g}), e.g. params: {{{key}: 10}}",
                        name,
                    )
                out[key] = default
                continue
            v = raw[key]
            ok_type = (
                isinstance(v, int) if kind is int else isinstance(v, (int, float))
            ) and not isinstance(v, bool)
            if not ok_type or not low <= v <= high:
                what = "an integer" if kind is int else "a number"
                raise self.error(
                    f"param {key!r} of {aggregation!r} must be {what} in {low:g}..{high:g}, "
                    f"got {v!r}",
                    name,
                )
            out[key] = kind(v)
        return out

    def number(self, raw: Any, what: str, name: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise self.error(f"{what} must be a number, got {raw!r}", name)
        return float(raw)

    # -- derived features

    def derived(
        self,
        index: int,
        items: Sequence[Any],
        features: Sequence[FeatureSpec],
        earlier: Sequence[DerivedFeatureSpec],
    ) -> DerivedFeatureSpec:
        label = f"derived[{index}]"
        item = items[index]
        if not isinstance(item, dict):
            raise self.error(
                f"{label} must be a mapping with keys {_quoted(DERIVED_REQUIRED)}, got "
                f"{type(item).__name__} {item!r}"
            )
        if "name" not in item:
            raise self.error(f"{label} has no 'name'; add name: <lowercase_name>")
        name = self.name(item["name"], None, "derived feature")
        self.check_keys(item, DERIVED_KEYS, where="a derived feature", feature=name)
        for key in DERIVED_REQUIRED:
            if key not in item:
                raise self.error(
                    f"missing required key {key!r}; a derived feature needs "
                    f"{_quoted(DERIVED_REQUIRED)}",
                    name,
                )
        self.claim(name, f"derived feature {name!r}", name)

        entity_types = sorted({f.entity_type for f in features})
        raw_entity = item["entity"]
        entity = (
            raw_entity[:-3]
            if isinstance(raw_entity, str) and raw_entity.endswith("_id")
            else raw_entity
        )
        if entity not in entity_types:
            raise self.error(
                f"unknown entity {raw_entity!r}; entity types with features: "
                f"{_quoted(entity_types)}",
                name,
            )
        text = item["expression"]
        try:
            expr = parse_derived(text)
        except FilterSyntaxError as exc:
            raise FilterSyntaxError(
                f"bad expression {text!r}: {exc.reason}", file=self.file, feature=name
            ) from exc

        # every name a derived feature may read: window values and earlier derived features
        owners: dict[str, tuple[str, str]] = {}  # value name -> (entity type, aggregation)
        for f in features:
            for wname in f.window_names():
                owners[wname] = (f.entity_type, f.aggregation)
        for d in earlier:
            owners[d.name] = (d.entity_type, "derived")
        later = {str(x.get("name")) for x in items[index + 1 :] if isinstance(x, dict)}
        unknown = sorted(expr.fields - set(owners))
        if unknown:
            same = [n for n, (e, _) in owners.items() if e == entity]
            first = unknown[0]
            why = (
                f"; {first!r} is defined later in 'derived', move it above"
                if first in later
                else _did_you_mean(first, same)
            )
            raise self.error(
                f"expression {text!r} references unknown inputs: {_quoted(unknown)}{why}; "
                f"inputs are window values such as item_views_1d or earlier derived features "
                f"of entity {entity!r}: {_quoted(same[:12])}{', ...' if len(same) > 12 else ''}",
                name,
            )
        for ref in sorted(expr.fields):
            ref_entity, aggregation = owners[ref]
            if ref_entity != entity:
                raise self.error(
                    f"expression {text!r} mixes entity types: {ref!r} is a {ref_entity} "
                    f"feature, but this derived feature's entity is {entity!r}; a derived "
                    "feature combines features of one entity type",
                    name,
                )
            if aggregation == "last_n":
                raise self.error(
                    f"{ref!r} is a last_n list, not a number; derived features combine "
                    "numeric values",
                    name,
                )
        default = self.number(item.get("default", 0.0), "default", name)
        return DerivedFeatureSpec(
            name=name,
            entity_type=entity,
            expression=text,
            inputs=tuple(sorted(expr.fields)),
            default=default,
        )
