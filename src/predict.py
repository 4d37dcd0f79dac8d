"""Classify texts with a logged or registered model.

    python -m src.predict --model models:/imdb-sentiment@champion "A wonderful film." "Dull and too long."
    python -m src.predict --model models:/imdb-sentiment@champion --input reviews.csv --output predictions.csv

Prints or writes one row per text: the label and one probability per class. Texts are scored in
length-sorted batches; a progress bar follows files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli import fail, main, quiet_libraries


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("texts", nargs=-1)
@click.option("--model", "model_uri", required=True,
              help="MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model.")
@click.option("--input", "input_path", type=click.Path(path_type=Path),
              help="CSV, JSON lines or Parquet file of texts.")
@click.option("--text-column", default="text", show_default=True, help="Column of --input holding the texts.")
@click.option("--label-column", default="",
              help="Column of --input holding true labels: checked against the model's label map, accuracy reported.")
@click.option("--output", "output_path", type=click.Path(path_type=Path),
              help="Write the input rows plus predictions here (.csv, .jsonl or .parquet); default: print.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
def predict(texts: tuple[str, ...], model_uri: str, input_path: Path | None, text_column: str, label_column: str,
            output_path: Path | None, batch_size: int) -> None:
    """Label texts with a trained classifier (no network needed for a registered model)."""
    from .base.config import ConfigError

    if bool(texts) == bool(input_path):
        fail(ConfigError("give texts as arguments or --input FILE (one of the two)"))
    if output_path is not None and output_path.suffix.lower() not in (".csv", ".jsonl", ".parquet"):
        fail(ConfigError(f"--output must end in .csv, .jsonl or .parquet, got {output_path.name!r}"))
    if output_path is not None:
        _check_output(output_path, input_path)
    frame = None
    if input_path is not None:
        frame = _read_input(input_path, text_column, label_column)
        texts = tuple(frame[text_column])
    elif label_column:
        fail(ConfigError("--label-column needs --input FILE"))
    else:
        _check_arguments(texts)
    classifier = _load(model_uri)
    truth = None
    if label_column:
        truth = frame[label_column].astype(str).tolist()
        unknown = sorted(set(truth) - set(classifier.labels))
        if unknown:
            fail(ConfigError(f"labels {unknown[:5]} in column {label_column!r} of {input_path} are not labels of "
                             f"this model ({classifier.labels}); it was trained on another label map"))
    out = classifier.classify(list(texts), batch_size=batch_size,
                              progress="predict" if input_path is not None else None)
    if truth is not None:
        accuracy = sum(p == t for p, t in zip(out["label"], truth, strict=True)) / len(truth)
        click.echo(f"accuracy against {label_column!r}: {accuracy:.4f} ({len(truth)} texts)", err=True)
    _show_or_write(out, frame, texts, output_path)


def _read_input(input_path: Path, text_column: str, label_column: str):
    """The --input rows, with the columns asked for: checked before any model loads."""
    from .base.config import ConfigError
    from .core.data import read_file

    try:
        frame = read_file(str(input_path))
    except ConfigError as exc:
        fail(exc)
    if text_column not in frame.columns:
        columns = ", ".join(map(str, frame.columns))
        fail(ConfigError(f"{input_path} has no column {text_column!r} (columns: {columns}); set --text-column"))
    if frame.empty:
        fail(ConfigError(f"{input_path} has no rows"))
    if label_column and label_column not in frame.columns:
        fail(ConfigError(f"{input_path} has no column {label_column!r}; set --label-column"))
    _check_column(frame[text_column], f"column {text_column!r} of {input_path}", "text")
    if label_column:
        _check_column(frame[label_column], f"column {label_column!r} of {input_path}", "label")
    return frame


def _check_arguments(texts: tuple[str, ...]) -> None:
    """Texts to score: not empty, and valid Unicode (an argument whose bytes are not UTF-8 arrives as
    lone surrogates, which no tokenizer can encode)."""
    from .base.config import ConfigError

    for i, text in enumerate(texts, 1):
        reason = _not_unicode(text)
        if reason:
            fail(ConfigError(f"text argument {i} {reason}; pass UTF-8 text (check the terminal's encoding, "
                             f"e.g. LANG=C.UTF-8)"))
        if not text.strip():
            fail(ConfigError(f"text argument {i} is empty; pass the texts to label"))


def _check_column(column, where: str, what: str) -> None:
    """Every row holds a string (labels: any value): a null, number or list would otherwise reach the
    tokenizer and stop the run with a traceback after the model loaded."""
    from .base.config import ConfigError

    def problem(value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "empty"
        if what == "label":
            return ""
        if not isinstance(value, str):
            return type(value).__name__
        return _not_unicode(value) or ("empty" if not value.strip() else "")

    bad = [(n, reason) for n, value in enumerate(column.tolist(), 1) if (reason := problem(value))]
    if bad:
        shown = ", ".join(f"row {n}: {reason}" for n, reason in bad[:3])
        fail(ConfigError(f"{len(bad)} row(s) of {where} hold no usable {what} ({shown}; rows counted from 1, "
                         f"an empty cell or NA reads as empty); fix or drop them"))


def _not_unicode(text: str) -> str:
    """'' for text that encodes as UTF-8, else what is wrong with it."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        if "\udc80" <= char <= "\udcff":  # how Python decodes a byte that is not UTF-8 (surrogateescape)
            return f"is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x})"
        return f"holds {char!r}, half of a UTF-16 surrogate pair"


def _load(model_uri: str):
    from .base.config import ConfigError
    from .mlflow_io.serving import load

    quiet_libraries()
    try:
        if model_uri.startswith(("models:/", "runs:/")):  # held by the tracking server: is it up?
            from .mlflow_io.tracking import check_reachable

            check_reachable()  # seconds, where MLflow's client would retry for minutes
        return load(model_uri)  # weights and JSON files only: nothing from the store is unpickled
    except ConfigError as exc:
        fail(exc)
    except Exception as exc:  # noqa: BLE001 - any other lookup failure becomes one line
        fail(ConfigError(f"cannot load model {model_uri!r}: {str(exc).splitlines()[0]}"))


def _show_or_write(out, frame, texts: tuple[str, ...], output_path: Path | None) -> None:
    """Printed as a table (texts shortened), or the input rows plus predictions written to --output."""
    if output_path is None:
        shown = out.copy()
        shown.insert(0, "text", [t if len(t) <= 60 else t[:57] + "..." for t in texts])
        click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return
    result = out if frame is None else frame.reset_index(drop=True).join(out.add_prefix("predicted_"))
    suffix = output_path.suffix.lower()
    if suffix == ".csv":
        result.to_csv(output_path, index=False)
    elif suffix == ".jsonl":
        result.to_json(output_path, orient="records", lines=True)
    else:
        result.to_parquet(output_path)
    click.echo(f"wrote {len(result)} predictions to {output_path}", err=True)


def _check_output(output_path: Path, input_path: Path | None) -> None:
    """Before any model loads: the output can be written, and it is not the input."""
    import os

    from .base.config import ConfigError

    if input_path is not None and output_path.resolve() == input_path.resolve():
        fail(ConfigError(f"--output {output_path} is the input file; write the predictions elsewhere"))
    if output_path.is_dir():
        fail(ConfigError(f"--output {output_path} is a folder; give a file name ending in .csv, .jsonl or .parquet"))
    folder = output_path.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        fail(ConfigError(f"--output {output_path}: folder {folder} does not exist or is not writable"))


if __name__ == "__main__":
    sys.exit(main(predict, "python -m src.predict"))
