"""``fedcare predict``: score new patients at the site with an exported release."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedcare.cli.common import console, errors, guarded


def predict(
    release: Annotated[
        Path, typer.Option("--release", help="Folder written by fedcare release export.")
    ],
    data: Annotated[Path, typer.Option("--data", help="CSV or Parquet of patients to score.")],
    mapping_file: Annotated[Path, typer.Option("--mapping", help="The site's mapping.yaml.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the scores (CSV).")],
    preprocessing: Annotated[
        Path | None,
        typer.Option(
            "--preprocessing",
            help="The site's fitted preprocessing (STATE_DIR/preprocessing/HASH.json), for a "
            "study that fits imputation or scaling at each site.",
        ),
    ] = None,
    keep: Annotated[
        list[str] | None,
        typer.Option("--keep", help="A data column to copy into the scores (repeatable)."),
    ] = None,
) -> None:
    """Score patients with a promoted release: the same mapping, transforms and
    preprocessing as training, so the scores equal the validation path's."""
    from fedcare.releases.bundle import load_bundle, load_site_preprocessing
    from fedcare.schema.mapping import Violation, load_mapping
    from fedcare.schema.readers import read_table
    from fedcare.site.predict import FLAGGED, preprocessing_for, score_table

    started = time.perf_counter()

    def run() -> tuple[int, int, tuple[Violation, ...], float]:
        bundle = load_bundle(release)
        fitted = (
            None
            if preprocessing is None
            else load_site_preprocessing(preprocessing, bundle.manifest)
        )
        prep = preprocessing_for(bundle, fitted)
        scores, notices = score_table(
            bundle, read_table(data), load_mapping(mapping_file), prep, keep or ()
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        scores.to_csv(partial, index=False, float_format="%.6f")
        partial.replace(out)
        return len(scores), int(scores[FLAGGED].sum()), notices, bundle.manifest.threshold

    rows, flagged, notices, threshold = guarded(run)
    for notice in notices:
        errors.print(f"[yellow]note[/] {escape(str(notice))}")
    console.print(
        f"[green]scored[/] {rows} rows, {flagged} at or above the threshold {threshold:g}; "
        f"wrote {escape(str(out))} in {time.perf_counter() - started:.1f} s"
    )
