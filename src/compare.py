"""`python -m src.compare`: the results table and charts of tracked runs (flows/report.py).

    python -m src.compare --experiment-name imdb-sentiment
    python -m src.compare --experiment-name imdb-sentiment,other-experiment --output-dir report
    python -m src.compare --run-ids ID1,ID2,ID3
    python -m src.compare --filter-string "params.lora_r = '8'"
    mlflow run . -e compare -P experiment_name=imdb-sentiment
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from .base.config import CompareConfig, ConfigError
from .cli import config_options, fail, main

COMPARE_FIELDS = dataclasses.fields(CompareConfig)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options(fields=COMPARE_FIELDS)
def compare(**values: Any) -> None:
    """Results table (Markdown, CSV) and charts of tracked training runs, logged as a `compare` run."""
    from .flows.report import (
        FILES,
        champion_runs,
        check_output_dir,
        log_report,
        markdown,
        results_table,
        select_runs,
        write_report,
    )
    from .mlflow_io.tracking import check_reachable

    try:
        cc = CompareConfig(**values)
        check_output_dir(cc)
        check_reachable()
        runs, experiment_id = select_runs(cc)
    except ConfigError as exc:
        fail(exc)
        return
    table = results_table(runs, champion_runs(cc.registered_model_name))
    folder = Path(cc.output_dir)
    files = write_report(table, folder)
    run_id = log_report(cc, files, table, experiment_id)
    click.echo(markdown(table))
    click.echo(f"{len(table)} run(s) -> {folder}/ ({', '.join(FILES)}); logged to run {run_id}")


if __name__ == "__main__":
    main(compare, "python -m src.compare")
