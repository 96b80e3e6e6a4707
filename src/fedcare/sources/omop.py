"""OMOP CDM 5.4 databases into one row per index visit, by SQL inside the database.

Each measured field is one query: the site's measurements of the mapped concepts,
in the mapped units, linked to the index visit (or, when a row names no visit, to
the visit of the same person whose window it falls in), ranked in the window by the
mapping's ``pick``, and only the chosen value per visit returned. The counts of
unmapped concepts and foreign units are grouped in the database too. Only the
extracted table (one row per visit, the schema's fields) enters fedcare.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from fedcare.schema.features import FeatureSchema
from fedcare.schema.mapping import MappingError, check_mapping
from fedcare.schema.readers import DataFileError
from fedcare.sources.extract import (
    AGE_UNIT,
    NO_UNIT,
    Extract,
    Linear,
    Tally,
    check_picks,
    completed_years,
    conversions,
    identity_mapping,
    to_schema,
)
from fedcare.sources.mapping import Coded, Demographic, ExtractMapping, Measured, Pick

PERSON_COLUMNS = (
    "gender_concept_id",
    "race_concept_id",
    "ethnicity_concept_id",
    "gender_source_value",
    "race_source_value",
    "ethnicity_source_value",
)
"""The person columns a demographic field may name (besides ``age``)."""


class OmopError(DataFileError):
    """An OMOP database that cannot be reached or read as CDM 5.4."""


def _concepts(codes: list[str], what: str, site: str) -> list[int]:
    try:
        return [int(code) for code in codes]
    except ValueError:
        raise MappingError(
            f"mapping for site '{site}': {what}: OMOP concept ids are integers, got {codes}"
        ) from None


def cdm_tables(schema_name: str | None = None) -> dict[str, sa.Table]:
    """The CDM 5.4 tables the extraction reads, by name: the columns it reads and, for a
    database written from scratch (the demo's), the required dates beside each datetime
    and indexes on what it joins on. Declared, not reflected: a missing table or column
    is an error when queried."""
    metadata = sa.MetaData(schema=schema_name)
    big, dt, day, text = sa.BigInteger, sa.DateTime, sa.Date, sa.String(50)
    person = sa.Table(
        "person",
        metadata,
        sa.Column("person_id", big, primary_key=True),
        sa.Column("gender_concept_id", big),
        sa.Column("year_of_birth", sa.Integer),
        sa.Column("month_of_birth", sa.Integer),
        sa.Column("day_of_birth", sa.Integer),
        sa.Column("birth_datetime", dt),
        sa.Column("race_concept_id", big),
        sa.Column("ethnicity_concept_id", big),
        sa.Column("gender_source_value", text),
        sa.Column("race_source_value", text),
        sa.Column("ethnicity_source_value", text),
    )
    visit = sa.Table(
        "visit_occurrence",
        metadata,
        sa.Column("visit_occurrence_id", big, primary_key=True),
        sa.Column("person_id", big, index=True),
        sa.Column("visit_concept_id", big),
        sa.Column("visit_start_date", day),
        sa.Column("visit_start_datetime", dt),
        sa.Column("visit_end_date", day),
        sa.Column("visit_type_concept_id", big),
        sa.Column("discharged_to_concept_id", big),
    )
    tables = {"person": person, "visit_occurrence": visit}
    for name in ("measurement", "observation"):
        tables[name] = sa.Table(
            name,
            metadata,
            sa.Column(f"{name}_id", big, primary_key=True),
            sa.Column("person_id", big, index=True),
            sa.Column(f"{name}_concept_id", big, index=True),
            sa.Column(f"{name}_date", day),
            sa.Column(f"{name}_datetime", dt),
            sa.Column(f"{name}_type_concept_id", big),
            sa.Column("value_as_number", sa.Float),
            sa.Column("value_as_concept_id", big),
            sa.Column("unit_concept_id", big),
            sa.Column("visit_occurrence_id", big, index=True),
        )
    tables["condition_occurrence"] = sa.Table(
        "condition_occurrence",
        metadata,
        sa.Column("condition_occurrence_id", big, primary_key=True),
        sa.Column("person_id", big, index=True),
        sa.Column("condition_concept_id", big),
        sa.Column("condition_start_date", day),
        sa.Column("condition_start_datetime", dt),
        sa.Column("condition_type_concept_id", big),
        sa.Column("visit_occurrence_id", big, index=True),
    )
    return tables


class _Cdm:
    """The tables one extraction queries."""

    def __init__(self, schema_name: str | None) -> None:
        tables = cdm_tables(schema_name)
        self.person = tables["person"]
        self.visit = tables["visit_occurrence"]
        self.events = {name: tables[name] for name in ("measurement", "observation")}
        self.condition = tables["condition_occurrence"]


def _hours(engine: Engine | Connection, later: Any, start: Any) -> Any:
    """Hours from ``start`` to ``later``, in the database's own date arithmetic."""
    if engine.dialect.name == "sqlite":
        return (sa.func.julianday(later) - sa.func.julianday(start)) * 24.0
    return sa.extract("epoch", later - start) / 3600.0


class _Query:
    def __init__(self, cdm: _Cdm, mapping: ExtractMapping, conn: Connection) -> None:
        self.cdm = cdm
        self.mapping = mapping
        self.conn = conn
        self.classes = _concepts(mapping.index.classes, "index.classes", mapping.site)

    def index_visits(self) -> sa.Select[Any]:
        v = self.cdm.visit
        query = sa.select(v.c.visit_occurrence_id, v.c.person_id, v.c.visit_start_datetime)
        if self.classes:
            query = query.where(v.c.visit_concept_id.in_(self.classes))
        return query.where(v.c.visit_start_datetime.is_not(None))

    def linked(
        self, table: sa.TableClause, visits: Any, when: str, window: tuple[float, float]
    ) -> Any:
        """Rows of ``table`` in an index visit, or naming no visit but the same person at a
        time (column ``when``) within ``window`` hours of the visit's start."""
        hours = _hours(self.conn, table.c[when], visits.c.visit_start_datetime)
        return sa.or_(
            table.c.visit_occurrence_id == visits.c.visit_occurrence_id,
            sa.and_(
                table.c.visit_occurrence_id.is_(None),
                table.c.person_id == visits.c.person_id,
                hours.between(*window),
            ),
        )

    def rows(self) -> list[sa.Row[Any]]:
        v, p = self.cdm.visit, self.cdm.person
        query = (
            sa.select(
                v.c.visit_occurrence_id,
                v.c.visit_start_datetime,
                v.c.discharged_to_concept_id,
                p.c.year_of_birth,
                p.c.month_of_birth,
                p.c.day_of_birth,
                p.c.birth_datetime,
                *(p.c[c] for c in PERSON_COLUMNS),
            )
            .join(p, p.c.person_id == v.c.person_id)
            .where(v.c.visit_start_datetime.is_not(None))
            .order_by(v.c.visit_occurrence_id)
        )
        if self.classes:
            query = query.where(v.c.visit_concept_id.in_(self.classes))
        return list(self.conn.execute(query))

    def picked(
        self, name: str, rule: Measured, linear: dict[str, Linear]
    ) -> dict[int, tuple[Any, Any]]:
        """visit id -> (value, unit concept) chosen by the rule in its window."""
        table = self.cdm.events[rule.table]
        concept = table.c[f"{rule.table}_concept_id"]
        moment = table.c[f"{rule.table}_datetime"]
        visits = self.index_visits().subquery("visits")
        value = table.c.value_as_concept_id if rule.values else table.c.value_as_number
        hours = _hours(self.conn, moment, visits.c.visit_start_datetime)
        where = [
            concept.in_(_concepts(rule.codes, name, self.mapping.site)),
            value.is_not(None),
            moment.is_not(None),
            hours.between(*rule.window_h),
        ]
        if rule.units is not None:
            where.append(table.c.unit_concept_id.in_([int(u) for u in rule.units]))
        if rule.pick in (Pick.MIN, Pick.MAX):
            converted = sa.case(
                *(
                    (table.c.unit_concept_id == int(u), value * f + o)
                    for u, (f, o) in linear.items()
                ),
                else_=value,
            )
            order = converted.asc() if rule.pick is Pick.MIN else converted.desc()
        else:
            order = moment.asc() if rule.pick is Pick.FIRST else moment.desc()
        rank = (
            sa.func.row_number()
            .over(
                partition_by=visits.c.visit_occurrence_id,
                order_by=(order, table.c[f"{rule.table}_id"]),
            )
            .label("rank")
        )
        ranked = (
            sa.select(
                visits.c.visit_occurrence_id.label("visit"),
                value.label("value"),
                table.c.unit_concept_id.label("unit"),
                rank,
            )
            .select_from(table.join(visits, self.linked(table, visits, moment.name, rule.window_h)))
            .where(*where)
            .subquery("ranked")
        )
        query = sa.select(ranked.c.visit, ranked.c.value, ranked.c.unit).where(ranked.c.rank == 1)
        return {row.visit: (row.value, row.unit) for row in self.conn.execute(query)}

    def foreign_units(self, name: str, rule: Measured) -> list[tuple[Any, int]]:
        """Rows of the field's concepts, linked to an index visit as :meth:`picked` links
        them, whose unit the mapping does not list, counted by unit: they are refused, in
        or out of the window, as FHIR refuses them."""
        if rule.units is None:
            return []
        table = self.cdm.events[rule.table]
        visits = self.index_visits().subquery("visits")
        concept = table.c[f"{rule.table}_concept_id"]
        unit = table.c.unit_concept_id
        when = f"{rule.table}_datetime"
        query = (
            sa.select(unit, sa.func.count())
            .select_from(table.join(visits, self.linked(table, visits, when, rule.window_h)))
            .where(
                concept.in_(_concepts(rule.codes, name, self.mapping.site)),
                table.c.value_as_number.is_not(None),
                sa.or_(unit.is_(None), unit.not_in([int(u) for u in rule.units])),
            )
            .group_by(unit)
        )
        return [(row[0], int(row[1])) for row in self.conn.execute(query)]

    def unmapped(self, table_name: str, mapped: list[int]) -> list[tuple[Any, int]]:
        """Rows of the index visits whose concept no field names, counted by concept (rows
        naming no visit have no window to place them by, and are not counted)."""
        table = self.cdm.events[table_name]
        visits = self.index_visits().subquery("visits")
        concept = table.c[f"{table_name}_concept_id"]
        count = sa.func.count().label("n")
        query = (
            sa.select(concept, count)
            .select_from(
                table.join(visits, table.c.visit_occurrence_id == visits.c.visit_occurrence_id)
            )
            .where(concept.not_in(mapped) if mapped else sa.true())
            .group_by(concept)
            .order_by(count.desc(), concept)
        )
        return [(row[0], int(row[1])) for row in self.conn.execute(query)]

    def labelled(self, rule: Coded, table: sa.TableClause, column: str, when: str) -> set[int]:
        visits = self.index_visits().subquery("visits")
        hours = _hours(self.conn, table.c[when], visits.c.visit_start_datetime)
        query = (
            sa.select(visits.c.visit_occurrence_id)
            .distinct()
            .select_from(table.join(visits, self.linked(table, visits, when, rule.window_h)))
            .where(
                table.c[column].in_(_concepts(rule.codes, "label", self.mapping.site)),
                hours.between(*rule.window_h),
            )
        )
        return {row[0] for row in self.conn.execute(query)}


def _moment(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return None


def _age(row: sa.Row[Any], tally: Tally, name: str) -> float:
    start = _moment(row.visit_start_datetime)
    born_at = _moment(row.birth_datetime)
    if born_at is not None:
        born = born_at.date()
    elif None in (row.year_of_birth, row.month_of_birth, row.day_of_birth):
        tally.note(name, "person's birth month or day unknown: age left missing", unit="visit")
        return math.nan
    else:
        born = date(row.year_of_birth, row.month_of_birth, row.day_of_birth)
    assert start is not None  # index visits have a start
    return float(completed_years(born, start))


def _demographic(
    rule: Demographic, row: sa.Row[Any], tally: Tally, name: str, linear: dict[str, Linear]
) -> object:
    if rule.patient == "age":
        return to_schema(linear, AGE_UNIT, _age(row, tally, name))
    value = getattr(row, rule.patient)
    return math.nan if value is None else str(value)


def _number(value: Any) -> float:
    """A NUMERIC column's Decimal or a REAL's float, as a float."""
    return float(value)


def read_omop(
    url: str, schema_name: str | None, mapping: ExtractMapping, schema: FeatureSchema
) -> Extract:
    """Extract one row per index visit from an OMOP CDM 5.4 database.

    Raises :class:`OmopError` for a database that cannot be reached or lacks a CDM
    table or column, and :class:`MappingError` for a mapping that does not fit.
    """
    check_picks(mapping)
    unknown = sorted({d.patient for d in mapping.demographic().values()} - {"age", *PERSON_COLUMNS})
    if unknown:
        raise MappingError(
            f"mapping for site '{mapping.site}': person fields {unknown} are not read from "
            f"OMOP (use age or one of {', '.join(PERSON_COLUMNS)})"
        )
    site_mapping = identity_mapping(mapping, schema)
    check_mapping(site_mapping, schema)
    linear = conversions(mapping, schema)
    try:
        engine = sa.create_engine(url)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise OmopError(f"source.url: not a database URL SQLAlchemy can open: {exc}") from exc
    tally = Tally()
    try:
        with engine.connect() as conn:
            frame = _extract(_Query(_Cdm(schema_name), mapping, conn), linear, tally, schema)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).split("\n", 1)[0]
        raise OmopError(
            f"{engine.url.render_as_string(hide_password=True)}: cannot read the OMOP CDM "
            f"tables: {reason}"
        ) from exc
    finally:
        engine.dispose()
    return Extract(frame, site_mapping, tally.notice_list(), tally.violation_list())


def _extract(
    query: _Query, linear: dict[str, dict[str, Linear]], tally: Tally, schema: FeatureSchema
) -> pd.DataFrame:
    mapping = query.mapping
    rows = query.rows()
    columns: dict[str, list[object]] = {}
    for name, person in mapping.demographic().items():
        ages = linear.get(name, {})
        columns[name] = [_demographic(person, row, tally, name, ages) for row in rows]
    mapped: dict[str, list[int]] = {"measurement": [], "observation": []}
    for name, rule in mapping.measured().items():
        mapped[rule.table] += _concepts(rule.codes, name, mapping.site)
        for unit, count in query.foreign_units(name, rule):
            shown = NO_UNIT if unit is None else str(unit)
            tally.refuse(
                name,
                f"unit concept {shown} is not among the mapped units {sorted(rule.units or ())}",
                count,
                "row",
            )
        chosen = query.picked(name, rule, linear.get(name, {}))
        values: list[object] = []
        for row in rows:
            held = chosen.get(row.visit_occurrence_id)
            if held is None:
                values.append(math.nan)
            elif rule.values:
                values.append(str(held[0]))
            else:
                values.append(to_schema(linear.get(name, {}), str(held[1]), _number(held[0])))
        columns[name] = values
    label = mapping.label
    if label.observation is not None:
        mapped["measurement"] += _concepts(label.observation.codes, "label", mapping.site)
    for table_name in ("measurement", "observation"):
        if table_name == "observation" and not mapped["observation"]:
            continue
        for concept, count in query.unmapped(table_name, mapped[table_name]):
            tally.note(table_name, f"concept {concept} is not mapped: ignored", count, "row")
    name = schema.label.name
    if label.encounter_outcome is not None:
        columns[name] = [
            math.nan if r.discharged_to_concept_id is None else str(r.discharged_to_concept_id)
            for r in rows
        ]
    else:
        if label.condition is not None:
            cdm = query.cdm
            hit = query.labelled(
                label.condition, cdm.condition, "condition_concept_id", "condition_start_datetime"
            )
        else:
            assert label.observation is not None
            hit = query.labelled(
                label.observation,
                query.cdm.events["measurement"],
                "measurement_concept_id",
                "measurement_datetime",
            )
        columns[name] = [int(r.visit_occurrence_id in hit) for r in rows]
    return pd.DataFrame(columns)
