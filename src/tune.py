"""`python -m src.tune`: the Optuna search (flows/search.py); the winner is registered.

    python -m src.tune --n-trials 30
    python -m src.tune --n-trials 30 --study-name imdb-lora --storage sqlite:///optuna.db   # resumable
    OPTUNA_STORAGE=postgresql://user@db/optuna python -m src.tune --study-name team-search &   # N workers
    mlflow run . -e tune -P n_trials=30      # storage from OPTUNA_STORAGE: never an MLflow parameter
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import click

from .base.config import DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL, ConfigError, TuneConfig
from .base.environment import launched
from .cli import build_config, config_options, fail, main, quiet_libraries

TUNE_FIELDS = dataclasses.fields(TuneConfig)
# The search registers its winner unless told `--registered-model-name ""`; trials run the LoRA rate.
# Sampled per trial, so not options here: fix one by giving its search a single value.
SEARCHED = ("strategy", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# The study goes into the same experiment as `-e lora` / `-e full`, so one experiment tells the story.
TUNE_DEFAULTS = {"registered_model_name": DEFAULT_REGISTERED_MODEL, "experiment_name": DEFAULT_EXPERIMENT}
# Not MLproject parameters: `mlflow run` logs and prints every -P value, and a storage URL may hold a
# password. Under `mlflow run` the storage comes from OPTUNA_STORAGE.
NOT_IN_PROJECT = ("storage",)


def refuse_project_storage() -> None:
    """`mlflow run -P storage=...` logged and printed the URL before this process started: refused,
    whether or not it holds a password (MLflow logs it shell-quoted, so a password is not reliably seen)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    import mlflow

    if "storage" in mlflow.MlflowClient().get_run(run_id).data.params:
        raise ConfigError("-P storage is refused: MLflow has logged and printed it as parameter `storage` of this "
                          "run; pass the storage in OPTUNA_STORAGE, and change its password if it held one")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options(exclude=SEARCHED, defaults=TUNE_DEFAULTS)
@config_options(fields=TUNE_FIELDS)
def tune(**values: Any) -> None:
    """Optuna search over LoRA settings with nested MLflow runs; the winner goes to the registry."""
    if launched():
        fail(ConfigError("python -m src.tune runs one process per worker, not under torchrun or accelerate launch "
                         "(each rank would sample and prune its own trials); start one worker per GPU on the same "
                         "--storage: CUDA_VISIBLE_DEVICES=N python -m src.tune ... or --device cuda:N"))
    tune_values = {f.name: values.pop(f.name) for f in TUNE_FIELDS}
    cfg = build_config({**values, "strategy": "lora"})
    try:
        tc = TuneConfig(**tune_values)
        refuse_project_storage()
        quiet_libraries()
        from .flows.search import run_study

        result = run_study(cfg, tc)
    except ConfigError as exc:
        fail(exc)
        return
    click.echo(json.dumps(result, default=str))
    from .mlflow_io.tracking import ui_link

    click.echo(f"view in MLflow: {ui_link(result['experiment_id'])}", err=True)


if __name__ == "__main__":
    main(tune, "python -m src.tune")
