"""`python -m src.registry`: the promotion gate and the aliases, by hand.

    python -m src.registry register --run-id RUN_ID                 # an earlier run's model, through the gate
    python -m src.registry rollback --registered-model-name imdb-sentiment
    python -m src.registry promote --registered-model-name imdb-sentiment --version 3
    python -m src.registry policy --registered-model-name imdb-sentiment --alpha 0.01 --min-texts 500
    python -m src.registry seal --registered-model-name imdb-sentiment --version 1

The gate itself is gate.py; its rule promotion.py.
"""

from __future__ import annotations

import dataclasses

import click

from .base.config import DEFAULT_PROMOTION_ALPHA, DEFAULT_REGISTERED_MODEL, ConfigError, TrackingConfig
from .cli import config_options, fail, main, quiet_libraries
from .core.promotion import Policy


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def registry() -> None:
    """Model registry actions."""


NAME_OPTION = click.option("--registered-model-name", required=True, help="The registered model.")
POLICY_FIELDS = dataclasses.fields(Policy)


def _or_fail(call, *args):
    """call(*args), or the command's one-line error when it raises ConfigError."""
    try:
        return call(*args)
    except ConfigError as exc:
        fail(exc)


def _client_or_fail():
    import mlflow

    from .mlflow_io.tracking import check_reachable

    _or_fail(check_reachable)
    return mlflow.MlflowClient()


@registry.command("register")
@click.option("--run-id", required=True, help="A finished training run (or tuning trial) whose logged model to judge.")
@click.option("--registered-model-name", default=DEFAULT_REGISTERED_MODEL, show_default=True,
              help="Register under this name if the gate lets the model in.")
@click.option("--promotion-alpha", default=DEFAULT_PROMOTION_ALPHA, show_default=True, type=float,
              help="Only a level stricter than the registered model's policy has an effect.")
def register_command(run_id: str, registered_model_name: str, promotion_alpha: float) -> None:
    """Put an earlier run's logged model through the promotion gate: its test split is scored once by
    the model as stored (files checked against their digests), then judged against the champion."""
    import re

    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        fail(ConfigError(f"--run-id must be an MLflow run id (32 hex digits), got {run_id!r}"))
    # The name and level are checked as a training run checks them, before any download.
    _or_fail(lambda: TrackingConfig(registered_model_name=registered_model_name, promotion_alpha=promotion_alpha))
    _client_or_fail()
    quiet_libraries()
    from .flows.finetune import register_run

    # The decision's sentence is printed by the gate, on stdout here.
    _or_fail(register_run, run_id, registered_model_name, promotion_alpha)


@registry.command("rollback")
@NAME_OPTION
def rollback_command(registered_model_name: str) -> None:
    """Point `champion` back at `previous-champion` (run it again to undo)."""
    from .mlflow_io.gate import rollback

    client = _client_or_fail()
    moved = _or_fail(rollback, client, registered_model_name)
    click.echo(f"{registered_model_name}: champion -> version {moved['champion']}, "
               f"previous-champion -> version {moved['previous-champion']}")


@registry.command("promote")
@NAME_OPTION
@click.option("--version", required=True, help="The version that becomes champion, without the gate.")
def promote_command(registered_model_name: str, version: str) -> None:
    """Make a version champion by hand (the owner's choice, recorded on the version)."""
    from .mlflow_io.gate import promote

    client = _client_or_fail()
    before = _or_fail(promote, client, registered_model_name, version)
    click.echo(f"{registered_model_name}: champion -> version {version}"
               + (f", previous-champion -> version {before}" if before and before != version else ""))


@registry.command("policy")
@NAME_OPTION
@config_options(fields=POLICY_FIELDS, defaults=dict.fromkeys(f.name for f in POLICY_FIELDS))
def policy_command(registered_model_name: str, **values) -> None:
    """Show or set the registered model's promotion policy; submitters may only be stricter."""
    from mlflow.exceptions import MlflowException

    from .mlflow_io.gate import policy

    client = _client_or_fail()
    try:
        client.get_registered_model(registered_model_name)
    except MlflowException:
        fail(ConfigError(f"no registered model {registered_model_name!r}"))
    chosen = _or_fail(lambda: dataclasses.replace(policy(client, registered_model_name),
                                                  **{k: v for k, v in values.items() if v is not None}))
    for key, value in chosen.tags().items():
        client.set_registered_model_tag(registered_model_name, key, value)
    click.echo(f"{registered_model_name}: promotion policy {policy(client, registered_model_name)}")


@registry.command("seal")
@NAME_OPTION
@click.option("--version", required=True, help="A version logged before file digests were recorded.")
def seal_command(registered_model_name: str, version: str) -> None:
    """Record the sha256 of a version's files as they are now (for models logged by earlier releases):
    do it only for a version whose files you trust; later changes to them are then refused."""
    from .mlflow_io.gate import seal

    client = _client_or_fail()
    files = _or_fail(seal, client, registered_model_name, version)
    click.echo(f"{registered_model_name} version {version}: digests of {len(files)} files recorded")


if __name__ == "__main__":
    main(registry, "python -m src.registry")
