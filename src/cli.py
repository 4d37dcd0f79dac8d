"""Click commands, derived from the config dataclasses so flags can never drift from settings.

Flags take either spelling, `--learning-rate` or `--learning_rate`: the second is what
`mlflow run` passes for undeclared `-P learning_rate=...`, and matches the MLproject names.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .base.config import ConfigError, RunConfig, all_fields

TYPES = {"str": str, "int": int, "float": float}


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def config_options(fn: Callable | None = None, *, fields=None, exclude: tuple[str, ...] = (),
                   defaults: dict[str, Any] | None = None) -> Callable:
    """Add one click option per config field (all run settings unless `fields` is given); a command
    may drop fields or change their defaults."""
    defaults = defaults or {}

    def decorate(fn: Callable) -> Callable:
        for f in reversed(list(fields if fields is not None else all_fields())):
            if f.name in exclude:
                continue
            kind = f.metadata.get("type") or TYPES[f.type]
            kind = click.BOOL if kind is bool else kind  # `--flag true|false`: what MLproject passes
            choices = f.metadata.get("choices")
            default = defaults.get(f.name, f.default)
            fn = click.option(option_name(f.name), f.name, type=click.Choice(choices) if choices else kind,
                              default=default, show_default=default is not None, help=f.metadata["help"])(fn)
        return fn

    return decorate(fn) if fn is not None else decorate


def normalize_argv(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            head, sep, tail = arg.partition("=")
            arg = head.replace("_", "-") + sep + tail
        out.append(arg)
    return out


def fail(exc: Exception) -> None:
    from .base.urls import scrub

    line = f"error: {scrub(str(exc))}"  # a library may have echoed a URL it was given
    click.echo(line, err=True)
    mark_project_run_failed(line)
    sys.exit(2)


def mark_project_run_failed(line: str) -> None:
    """`mlflow run` creates the run (with a random name) before this process starts: a refused input
    ends it FAILED, named `refused: <what>`, with the reason as its description and an `error` tag,
    so the runs list says why the run is empty."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    # Exiting anyway: one short try, not MLflow's minutes of retries against a server that is gone.
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    import mlflow

    with contextlib.suppress(Exception):
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "mlflow.note.content", line)
        reason = line.removeprefix("error: ")
        client.set_tag(run_id, "error", reason)
        client.set_tag(run_id, "mlflow.runName", f"refused: {reason[:60]}" + ("..." if len(reason) > 60 else ""))
        client.set_terminated(run_id, "FAILED")


def move_tracking_credentials() -> None:
    """MLflow prints its tracking URI ("View run ... at: <uri>"): user info written into
    MLFLOW_TRACKING_URI moves to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow's
    client sends as HTTP basic auth and never prints. Variables already set win. A token alone
    (`https://TOKEN@host`) becomes the username with an empty password: MLflow's client sent no
    basic auth for it in the URI either, and sends none now (it needs both). A URI still holding a
    secret after that (a `?token=` value, user info it cannot read) is refused before MLflow starts."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    from .base.config import ConfigError
    from .base.urls import holds_credentials, mask, without_credentials

    bare, user, password = without_credentials(uri)
    if holds_credentials(bare):
        fail(ConfigError(f"MLFLOW_TRACKING_URI {mask(bare)} holds a secret this project cannot move out of it; "
                         f"put it in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"))
    if user is None and password is None:
        return
    os.environ["MLFLOW_TRACKING_URI"] = bare
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user or "")
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password or "")


def build_config(values: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.from_flat(values)
    except ConfigError as exc:
        fail(exc)
        raise  # unreachable; keeps type checkers calm


def quiet_libraries() -> None:
    """The expected 'newly initialized classifier' notice, the system-metrics monitor's start and
    stop lines and similar chatter hide real output. So do two progress bars: transformers' "Loading
    weights" on every load of a local folder, and MLflow's "Downloading artifacts", one bar per file
    of a logged model read back (a count of files, not of bytes). The hub's download bars stay: a
    first download can take minutes."""
    import logging

    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.logging.disable_progress_bar()  # which turns the hub's off too
    if hub_bars:
        huggingface_hub.utils.enable_progress_bars()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow.system_metrics", "mlflow.pyfunc"):  # monitor start/stop; "Validating input example"
        logging.getLogger(name).setLevel(logging.WARNING)


def main(command: click.Command, prog_name: str) -> None:
    """Run a command; a usage error becomes one `error:` line (click's default prints three). MLflow's
    own "View run/experiment at" lines are silenced: they open MLflow 3's GenAI overview, and each
    command prints its own `view in MLflow:` link to the runs list."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    move_tracking_credentials()
    try:
        command.main(args=normalize_argv(sys.argv[1:]), prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see {prog_name} --help)"
        fail(Exception(exc.format_message() + hint))
    except click.exceptions.Abort:
        sys.exit(130)


def _script(module: str, command: str):
    """A console script of pyproject.toml: imports its module only when run, as `python -m` does."""
    def run() -> None:
        import importlib

        main(getattr(importlib.import_module(f"src.{module}"), command), f"imdb-{module}")
    return run


train_main, tune_main = _script("train", "train"), _script("tune", "tune")
compare_main, predict_main = _script("compare", "compare"), _script("predict", "predict")
serve_main, registry_main = _script("serve", "serve"), _script("registry", "registry")
