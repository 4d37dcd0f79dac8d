"""Serve a logged or registered classifier over HTTP without running anything the store holds.

    python -m src.serve --model models:/imdb-sentiment@champion --port 5001

`mlflow models serve -m models:/...` executes the model's code file as stored on the tracking
server. This command instead reads only the weights (safetensors) and JSON files through the
project's loader, rebuilds the MLflow model folder locally around this checkout's own code, and
serves that folder with MLflow's own scoring app (`POST /invocations`, `GET /ping`) under uvicorn,
behind `guard.Guard`: a body-size limit, accepted content types, JSON checked before MLflow parses
it, and every error answered with one line (no stack trace, no copy of the request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import click

from .base.config import ServeConfig
from .cli import config_options, fail, main, quiet_libraries

# How the command hands its settings to each uvicorn worker, which imports `scoring_app` anew.
SETTINGS = "IMDB_SENTIMENT_SERVE"
SERVE_FIELDS = dataclasses.fields(ServeConfig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_uri", required=True,
              help="MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model.")
@config_options(fields=SERVE_FIELDS)
def serve(model_uri: str, **values) -> None:
    """Answer POST /invocations with the model's labels and probabilities."""
    from .base.config import ConfigError, ServeConfig

    try:
        sc = ServeConfig(**values)
    except ConfigError as exc:
        fail(exc)
    host, port, workers, max_body_mb = sc.host, sc.port, sc.workers, sc.max_body_mb
    import mlflow

    from .mlflow_io import serving, tracking

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="serve-") as tmp:
        folder = Path(tmp) / "files"
        try:
            tracking.check_reachable()
            _, config = serving.fetch(model_uri, folder)
            hashes = serving.train_text_hashes(model_uri) or set()
            mlflow.pyfunc.save_model(path=str(Path(tmp) / "model"),
                                     **tracking.servable_model(folder, config, hashes))
        except (ConfigError, ValueError) as exc:
            fail(exc)
        click.echo(f"serving {model_uri} on http://{host}:{port} (POST /invocations)", err=True)
        os.environ[SETTINGS] = json.dumps({"model_path": str(Path(tmp) / "model"), "max_body_mb": max_body_mb})
        root = str(Path(__file__).resolve().parents[1])  # where workers import src.serve from
        command = [sys.executable, "-m", "uvicorn", "--factory", "src.serve:scoring_app", "--app-dir", root,
                   "--host", host, "--port", str(port), "--workers", str(workers), "--no-server-header"]
        sys.exit(_run_until_stopped(command))


def scoring_app():
    """The app each uvicorn worker runs: MLflow's scoring app for the local model folder, guarded. The
    folder holds this checkout's code (`served_model.py`), which MLflow's loader executes."""
    from mlflow.pyfunc import load_model, scoring_server

    from .mlflow_io.guard import Guard

    settings = json.loads(os.environ[SETTINGS])
    model = load_model(settings["model_path"])
    return Guard(scoring_server.init(model), max_body=int(settings["max_body_mb"] * (1 << 20)))


def _run_until_stopped(command: list[str]) -> int:
    """Run the scoring server (uvicorn and its workers) in a process group of its own;
    Ctrl-C or SIGTERM stops the whole group, so no worker outlives this command and the temporary
    model folder is removed after it."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(command, start_new_session=True)

    def stop(*_) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        code = proc.wait()
        return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    except KeyboardInterrupt:
        stop()
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup below
        signal.signal(signal.SIGTERM, previous)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main(serve, "python -m src.serve")
