"""A site's data, mapped, split and preprocessed: everything local training needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from fedcare.schema.mapping import SiteMapping, apply_mapping
from fedcare.schema.preprocess import Preprocessor, fit_preprocessor
from fedcare.study import Study


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

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def prepare_site_data(frame: pd.DataFrame, mapping: SiteMapping, study: Study) -> SiteDataset:
    """Map, validate, split (stratified, seeded by the study) and preprocess a site's table.

    Raises :class:`fedcare.schema.mapping.DataValidationError` if the data breaks
    the schema, before anything is trained.
    """
    schema = study.feature_schema
    mapped = apply_mapping(frame, mapping, schema)
    labels = mapped[schema.label.name].to_numpy()
    positives = int(labels.sum())
    if positives < 2 or len(labels) - positives < 2:
        raise SiteDataError(
            f"site '{mapping.site}': label '{schema.label.name}' needs at least two rows of "
            f"each class to split off held-out data ({positives} positive of {len(labels)})"
        )
    train, test = train_test_split(
        mapped,
        test_size=study.preprocessing.holdout_fraction,
        random_state=(
            study.seed if study.preprocessing.split_seed is None else study.preprocessing.split_seed
        ),
        stratify=labels,
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
    )
