"""Serve a logged or registered classifier over HTTP without running anything the store holds.

    python -m src.serve --model models:/imdb-sentiment@champion --port 5001

`mlflow models serve -m models:/...` executes the model's code file as stored on the tracking
server. This command instead reads only the weights (safetensors) and JSON files through the
project's loader, rebuilds the MLflow model folder locally around this checkout's own code, and
hands that folder to MLflow's scoring server (`POST /invocations`, `GET /ping`).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import click

from .cli import fail, main


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_uri", required=True,
              help="MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
def serve(model_uri: str, host: str, port: int, workers: int) -> None:
    """Answer POST /invocations with the model's labels and probabilities."""

    import mlflow

    from . import serving, tracking
    from .config import ConfigError

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
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(Path(tmp) / "model"),
                   "--env-manager", "local", "--host", host, "--port", str(port), "--workers", str(workers)]
        sys.exit(_run_until_stopped(command))


def _run_until_stopped(command: list[str]) -> int:
    """Run MLflow's scoring server (it starts uvicorn and its workers) in a process group of its own;
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
