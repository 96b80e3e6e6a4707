"""A site's data, mapped, split and preprocessed: everything local training needs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedcare.schema.mapping import SiteMapping, Violation, apply_mapping
from fedcare.schema.preprocess import Preprocessor, fit_preprocessor
from fedcare.schema.split import keyed_holdout
from fedcare.study import Split, Study


class SiteDataError(ValueError):
    """Site data that is valid but cannot support a study (too few rows or one class)."""


@dataclass(frozen=True)
class SiteDataset:
    """One site's training and held-out data in model-input form."""

    name: str
    x_train: NDArray[np.float32]
    y_train: NDArray[np.float32]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.float32]
    test_frame: pd.DataFrame
    preprocessor: Preprocessor
    notices: tuple[Violation, ...] = ()
    """Values set to missing and rows left out by the mapping, with counts."""
    train_frame: pd.DataFrame | None = None
    """The mapped training rows (schema columns, before preprocessing)."""

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over exactly what training sees: the input matrix, the labels and the
        preprocessing parameters. Any changed row, value or parameter changes it."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(self.preprocessor.model_dump_json().encode())
        return digest.hexdigest()

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def prepare_site_data(
    frame: pd.DataFrame,
    mapping: SiteMapping,
    study: Study,
    notices: tuple[Violation, ...] = (),
) -> SiteDataset:
    """Map, validate, split (keyed per record, or stratified) and preprocess a site's table.

    ``notices`` are what reading the table's source already left out (a FHIR export's
    unmapped codes, say); they come first in the dataset's notices.

    Raises :class:`fedcare.schema.mapping.DataValidationError` if the data breaks
    the schema, before anything is trained.
    """
    schema = study.feature_schema
    table = apply_mapping(frame, mapping, schema)
    mapped = table.frame
    labels = mapped[schema.label.name].to_numpy()
    positives = int(labels.sum())
    if positives < 2 or len(labels) - positives < 2:
        raise SiteDataError(
            f"site '{mapping.site}': label '{schema.label.name}' needs at least two rows of "
            f"each class to split off held-out data ({positives} positive of {len(labels)})"
        )
    prep = study.preprocessing
    key = study.seed if prep.split_seed is None else prep.split_seed
    if prep.split is Split.STRATIFIED:
        # Imported here: the keyed split, the default, needs no scikit-learn.
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(
            mapped, test_size=prep.holdout_fraction, random_state=key, stratify=labels
        )
    else:
        held_out = keyed_holdout(mapped, prep.holdout_fraction, key)
        train, test = mapped[~held_out], mapped[held_out]
        for part, name in ((train, "training"), (test, "held-out")):
            y = part[schema.label.name]
            if y.nunique() < 2:
                raise SiteDataError(
                    f"site '{mapping.site}': the keyed split leaves {len(part)} {name} row(s) "
                    f"with a single class of '{schema.label.name}'; the site needs more rows"
                )
    preprocessor = fit_preprocessor(train, schema, study.preprocessing.scaling)
    return SiteDataset(
        name=mapping.site,
        x_train=preprocessor.transform(train, schema),
        y_train=train[schema.label.name].to_numpy(dtype=np.float32),
        x_test=preprocessor.transform(test, schema),
        y_test=test[schema.label.name].to_numpy(dtype=np.float32),
        test_frame=test.reset_index(drop=True),
        preprocessor=preprocessor,
        notices=notices + table.notices,
        train_frame=train.reset_index(drop=True),
    )
