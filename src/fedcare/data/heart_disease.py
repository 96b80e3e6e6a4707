"""Fed-Heart-Disease: the UCI Heart Disease files of four real centres, FLamby's protocol.

The four ``processed.*.data`` files (UCI data set 45, Janosi, Steinbrunn,
Pfisterer, Detrano 1988) are read from any folder; they are never copied into
the project. The protocol (the folder's README.md, and FLamby's
``fed_heart_disease`` loader) is applied exactly:

1. drop ``slope``, ``ca`` and ``thal``, then every row with a ``?`` (740 rows remain);
2. label = ``num > 0``;
3. one-hot encode ``cp`` and ``restecg`` without their first level: 13 inputs;
4. per centre, a shuffled 66 % / 34 % train/test split with random seed 43,
   stratified on the label when both classes have more than two rows (as FLamby
   does: Switzerland has a single negative row, which cannot be stratified);
5. z-score every input with the centre's own training mean and standard deviation.

Steps 1-2 are a reader plus a fedcare :class:`SiteMapping` per centre (each
centre's file spells its codes its own way); steps 3 and 5 are the study's
schema and ``scaling: site`` (fedcare's preprocessor), completed by scaling the
0/1 inputs too, since the protocol z-scores all 13 columns.

Two documented deviations from FLamby's code, both in how degenerate columns
are handled: standard deviations are the population ones (ddof 0, as fedcare's
preprocessor uses; FLamby divides by the ddof-1 value + 1e-9), and a column that
is constant in a centre's training rows (Switzerland's ``chol`` is always 0) is
centred but not divided, where FLamby divides by 1e-9 and sends any other test
value to about +-1e9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from fedcare.schema.features import FeatureSchema, FeatureType
from fedcare.schema.mapping import ColumnMapping, SiteMapping, apply_mapping
from fedcare.schema.preprocess import fit_preprocessor
from fedcare.schema.readers import DataFileError
from fedcare.schema.split import keyed_holdout
from fedcare.site.dataset import SiteDataset
from fedcare.study import Scaling, Split, Study, load_study

COLUMNS: tuple[str, ...] = (
    "age",
    "sex",
    "cp",
    "trestbps",
    "chol",
    "fbs",
    "restecg",
    "thalach",
    "exang",
    "oldpeak",
    "slope",
    "ca",
    "thal",
    "num",
)
"""The 14 columns of every ``processed.*.data`` file, in file order."""

DROPPED: tuple[str, ...] = ("slope", "ca", "thal")
"""Mostly missing outside Cleveland; the protocol drops them before dropping rows."""

MISSING = "?"

INPUT_NAMES: tuple[str, ...] = (
    "age",
    "sex",
    "cp=2",
    "cp=3",
    "cp=4",
    "trestbps",
    "chol",
    "fbs",
    "restecg=1",
    "restecg=2",
    "thalach",
    "exang",
    "oldpeak",
)
"""The 13 model inputs, in the order the model sees them (the study schema's order)."""


class HeartDiseaseDataError(DataFileError):
    """A heart-disease folder or file that is missing or malformed."""


@dataclass(frozen=True)
class Center:
    """One of the four centres: its name in results and its file in the data folder."""

    name: str
    file: str
    description: str
    float_codes: bool
    """Cleveland's file writes codes as ``1.0``; the others write ``1``."""


CENTERS: tuple[Center, ...] = (
    Center("Cleveland", "processed.cleveland.data", "Cleveland Clinic Foundation, USA", True),
    Center(
        "Hungary",
        "processed.hungarian.data",
        "Hungarian Institute of Cardiology, Budapest",
        False,
    ),
    Center(
        "Switzerland",
        "processed.switzerland.data",
        "University Hospitals Zurich and Basel",
        False,
    ),
    Center("VA", "processed.va.data", "V.A. Medical Center, Long Beach, USA", False),
)

CENTER_NAMES: tuple[str, ...] = tuple(c.name for c in CENTERS)


def heart_disease_study_path() -> Path:
    """The packaged Fed-Heart-Disease study file."""
    return Path(str(files("fedcare.data").joinpath("studies/heart_disease.yaml")))


def heart_disease_study() -> Study:
    """The packaged Fed-Heart-Disease study, validated."""
    return load_study(heart_disease_study_path())


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def read_center_file(path: Path) -> pd.DataFrame:
    """One centre's file as text cells, protocol step 1 applied (columns, then '?' rows dropped).

    Every line must hold 14 comma-separated cells, each a number or ``?``; the
    first that does not is reported with its line number.
    """
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise HeartDiseaseDataError(
            f"{path}: missing; the heart-disease folder needs "
            f"{', '.join(c.file for c in CENTERS)} (UCI data set 45)"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise HeartDiseaseDataError(f"{path}: cannot read the file: {exc}") from exc
    rows: list[list[str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(COLUMNS):
            raise HeartDiseaseDataError(
                f"{path}, line {number}: expected {len(COLUMNS)} comma-separated values "
                f"({', '.join(COLUMNS)}), found {len(cells)}"
            )
        for column, cell in zip(COLUMNS, cells, strict=True):
            if cell != MISSING and not _is_number(cell):
                raise HeartDiseaseDataError(
                    f"{path}, line {number}: column '{column}' holds {cell!r}, "
                    f"which is neither a number nor '{MISSING}'"
                )
        rows.append(cells)
    if not rows:
        raise HeartDiseaseDataError(f"{path}: the file has no rows")
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).drop(columns=list(DROPPED))
    complete = ~(frame == MISSING).any(axis=1)
    return frame.loc[complete].reset_index(drop=True)


def center_mapping(center: Center) -> SiteMapping:
    """The centre's mapping onto the study schema: recode its codes, binarise ``num``."""
    features: dict[str, ColumnMapping | str] = {
        name: name for name in COLUMNS if name not in (*DROPPED, "num")
    }
    if center.float_codes:
        features["cp"] = ColumnMapping(column="cp", values={f"{k}.0": str(k) for k in range(1, 5)})
        features["restecg"] = ColumnMapping(
            column="restecg", values={f"{k}.0": str(k) for k in range(3)}
        )
    # num is 0 (no disease) to 4; the protocol's label is num > 0.
    label = ColumnMapping(column="num", values={"0": 0, **{str(k): 1 for k in range(1, 5)}})
    return SiteMapping(site=center.name, features=features, label=label, missing_tokens=(MISSING,))


def protocol_split(
    frame: pd.DataFrame, labels: NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FLamby's split: shuffled, seeded, stratified only if both classes have more than 2 rows.

    Giving both sizes (66 % train, 34 % test) keeps the split identical to
    FLamby's ``train_test_split`` call.
    """
    counts = np.bincount(labels, minlength=2)
    stratify = labels if bool(np.all(counts > 2)) else None
    train, test = train_test_split(
        frame,
        test_size=test_fraction,
        train_size=1.0 - test_fraction,
        random_state=seed,
        shuffle=True,
        stratify=stratify,
    )
    return train, test


def _binary_input_columns(schema: FeatureSchema) -> list[int]:
    """Positions of the 0/1 model inputs (binary features and one-hot levels)."""
    positions: list[int] = []
    index = 0
    for feature in schema.features:
        width = len(feature.input_names())
        if feature.type is not FeatureType.CONTINUOUS:
            positions.extend(range(index, index + width))
        index += width
    return positions


def standardise_columns(
    x_train: NDArray[np.float32], x_test: NDArray[np.float32], columns: list[int]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Z-score ``columns`` with the training rows' mean and std; constant columns are only centred.

    fedcare's preprocessor scales continuous features only; the protocol also
    z-scores the 0/1 inputs, so this finishes the job with the same rule.
    """
    if not columns:
        return x_train, x_test
    train = x_train.astype(np.float64)
    test = x_test.astype(np.float64)
    mean = train[:, columns].mean(axis=0)
    std = train[:, columns].std(axis=0)
    spread = np.where(std > 1e-12, std, 1.0)
    train[:, columns] = (train[:, columns] - mean) / spread
    test[:, columns] = (test[:, columns] - mean) / spread
    return train.astype(np.float32), test.astype(np.float32)


def prepare_center(frame: pd.DataFrame, mapping: SiteMapping, study: Study) -> SiteDataset:
    """Map, split and z-score one centre: fedcare's ``prepare_site_data`` with FLamby's split.

    ``prepare_site_data`` always stratifies and refuses a site with fewer than two
    rows of a class; the protocol keeps Switzerland (one negative row) with a
    plain shuffled split instead.
    """
    schema = study.feature_schema
    mapped = apply_mapping(frame, mapping, schema).frame
    labels = mapped[schema.label.name].to_numpy(dtype=np.int64)
    spec = study.preprocessing
    seed = study.seed if spec.split_seed is None else spec.split_seed
    if spec.split is Split.KEYED:
        held_out = keyed_holdout(mapped, spec.holdout_fraction, seed)
        train, test = mapped[~held_out], mapped[held_out]
    else:
        train, test = protocol_split(mapped, labels, spec.holdout_fraction, seed)
    preprocessor = fit_preprocessor(train, schema, spec.scaling)
    x_train = preprocessor.transform(train, schema)
    x_test = preprocessor.transform(test, schema)
    if spec.scaling is Scaling.SITE:
        x_train, x_test = standardise_columns(x_train, x_test, _binary_input_columns(schema))
    return SiteDataset(
        name=mapping.site,
        x_train=x_train,
        y_train=train[schema.label.name].to_numpy(dtype=np.float32),
        x_test=x_test,
        y_test=test[schema.label.name].to_numpy(dtype=np.float32),
        test_frame=test.reset_index(drop=True),
        preprocessor=preprocessor,
        train_frame=train.reset_index(drop=True),
    )


def dp_safe(study: Study) -> Study:
    """The study with the preprocessing differential privacy allows: the schema's reference
    scaling and the keyed per-record split, in place of the protocol's site z-scores and
    shuffled split."""
    preprocessing = {**study.canonical()["preprocessing"], "scaling": "reference"}
    preprocessing["split"] = "keyed"
    return study.replace(preprocessing=preprocessing)


def load_heart_disease(data_dir: Path, study: Study | None = None) -> list[SiteDataset]:
    """The four centres from ``data_dir``, prepared for ``study`` (default: the packaged one).

    Raises :class:`HeartDiseaseDataError` naming a missing folder or file or the
    first malformed line, and :class:`fedcare.schema.mapping.DataValidationError`
    for values that break the schema.
    """
    if not data_dir.is_dir():
        raise HeartDiseaseDataError(
            f"{data_dir}: no such folder; give the folder holding "
            f"{', '.join(c.file for c in CENTERS)}"
        )
    study = study or heart_disease_study()
    return [
        prepare_center(read_center_file(data_dir / c.file), center_mapping(c), study)
        for c in CENTERS
    ]
