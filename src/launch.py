"""`mlflow run` with the tracking credentials out of the URI first: what `make demo|lora|full` run.

    python -m src.launch . -e lora --env-manager local --experiment-name imdb-sentiment -P epochs=1

takes `mlflow run`'s arguments. `mlflow run` itself prints MLFLOW_TRACKING_URI as it stands ("View run
... at: <uri>") before and after the project's command, in a process this project's code never runs
in: a user, password or token written into the URI would reach the console and CI logs. This moves
them to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (`cli.move_tracking_credentials`),
refuses a `-P` value that holds a credential (MLflow prints and logs every `-P` value), checks that a
remote tracking server answers (seconds, not MLflow's minutes of retries), then becomes `mlflow run`.
"""

from __future__ import annotations

import os
import sys

USAGE = ("usage: python -m src.launch PROJECT [mlflow run options]   (e.g. . -e lora --env-manager local)\n"
         "Runs `mlflow run` with the credentials of MLFLOW_TRACKING_URI moved to MLFLOW_TRACKING_USERNAME and\n"
         "MLFLOW_TRACKING_PASSWORD, so MLflow never prints them. Options: `mlflow run --help`.")


def params(argv: list[str]) -> list[tuple[str, str]]:
    """The -P NAME=VALUE pairs of an `mlflow run` command line, in all of click's spellings."""
    found, args = [], iter(argv)
    for arg in args:
        if arg in ("-P", "--param-list"):
            value = next(args, "")
        elif arg.startswith("--param-list="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-P"):
            value = arg[2:]
        else:
            continue
        name, _, val = value.partition("=")
        found.append((name, val))
    return found


def check_params(argv: list[str]) -> None:
    from .base.config import ConfigError
    from .base.urls import holds_credentials, mask

    for name, value in params(argv):
        if holds_credentials(value):
            raise ConfigError(f"-P {name}={mask(value)} holds a credential, and MLflow prints and logs every -P "
                              f"value; pass it in the environment instead (OPTUNA_STORAGE for the storage, "
                              f"docs/security.md)")


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    from .cli import move_tracking_credentials

    move_tracking_credentials()  # one `error:` line for a secret it cannot move
    # `mlflow run`'s own "View run/experiment at" lines open MLflow 3's GenAI overview; the project's
    # command prints a `view in MLflow:` link to the runs list instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from .base.config import ConfigError
    from .base.urls import scrub

    try:
        check_params(argv)
        if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
            from .mlflow_io.tracking import check_reachable  # imports MLflow: only for a server that may be down

            check_reachable()
    except ConfigError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        sys.exit(2)
    # The interpreter running this one: the venv's mlflow, as `$(BIN)/mlflow run` was.
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "run", *argv])


if __name__ == "__main__":
    main()
