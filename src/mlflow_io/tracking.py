"""Every MLflow call of a training run (naming, params, metrics, figures, lineage, models) and the
checks every command shares (reachability, experiments).

Other modules call MLflow for their own kind of record, each saying so in its docstring: gate.py
(the Model Registry) and serving.py (a logged model's files) beside this one; flows/search.py (a
search's parent run and its trials' tags), flows/report.py (reading runs; the report's run), and the
commands serve.py (a local copy of a model for the scoring server) and cli.py (a refused `mlflow run`
marked FAILED). Nothing in core/ or base/ imports MLflow (tests/test_structure.py).

The tracking URI comes from MLflow's own resolution: `MLFLOW_TRACKING_URI` (e.g. http://host:5000)
or, unset, the embedded `sqlite:///mlflow.db` in the working directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

from ..base import signals, strategies
from ..base.config import ConfigError, RunConfig, all_fields
from ..base.names import (
    BEST_EPOCH,
    EXPERIMENT_KIND,
    MODEL,
    MODEL_TRAINING,
    RESULTS_COLUMNS,
    RESULTS_VIEW,
    RUNS_VIEW,
    STRATEGY,
)
from ..base.urls import mask, scrub
from ..core import evaluate
from ..core.checkpoint import existing_ancestor
from ..core.data import fingerprint, tokenizer_hash
from ..core.loop import throughput
from . import serving


def check_reachable(timeout: float = 5.0) -> None:
    """A remote tracking server that is down should cost five seconds, not a training run: MLflow's
    own client would retry for minutes, and only after the model was trained. The probe is a real API
    call of MLflow's client, so its TLS (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS)
    and auth (MLFLOW_TRACKING_TOKEN, username/password, auth plugins) apply; retries and timeout are
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT when set, else none and `timeout`."""
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))}
    saved = {k: os.environ.get(k) for k in probe}
    os.environ.update({k: v for k, v in probe.items() if saved[k] is None})
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return
    except MlflowException as exc:
        status = getattr(exc, "get_http_status_code", lambda: 0)()
        reason = _short_reason(str(exc))
        if status in (401, 403):
            raise ConfigError(f"MLflow tracking server {redact(uri)} refuses these credentials (HTTP {status}); "
                              f"set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    raise ConfigError(f"MLflow tracking server {redact(uri)} is not reachable ({reason}); start it, fix "
                      f"MLFLOW_TRACKING_URI, or unset it to use the local sqlite:///mlflow.db")


def _short_reason(message: str) -> str:
    """The cause in MLflow's long request error: 'Connection refused', a TLS failure, a timeout."""
    import re

    tls = next((m for m in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "SSLError") if m in message), "")
    if tls:  # named before the retries it caused, most precise first: the certificate is what to fix
        return (f"TLS {tls}; a private CA's certificate goes in MLFLOW_TRACKING_SERVER_CERT_PATH, "
                f"or MLFLOW_TRACKING_INSECURE_TLS=true to skip the check")
    found = re.search(r"\[Errno -?\d+\] ([^\"')]+)", message) or re.search(
        r"(timed out|Max retries exceeded|HTTP \d+|status code \d+)", message)
    return found.group(1).strip() if found else message.splitlines()[0][:160]


def check_experiment(name: str) -> None:
    """A deleted experiment, or a local store or artifact folder this process cannot write, fails
    now: MLflow would only refuse when the run opens or, for artifacts, after training."""
    store = local_path(mlflow.get_tracking_uri())
    if store is not None:
        _check_writable(store, "the MLflow store")
        if not store.exists():
            return  # a fresh local store holds no experiment yet (opening it would create the file)
    if os.environ.get("MLFLOW_RUN_ID"):
        return  # inside `mlflow run`, which chose the experiment and opened the run
    experiment = live_experiment(mlflow.MlflowClient(), name)
    if experiment is None:
        return
    artifacts = local_path(experiment.artifact_location)
    if artifacts is not None:
        _check_writable(artifacts, f"the artifact folder of experiment {name!r}")


def live_experiment(client, name: str):
    """The experiment of that name, None if there is none; a deleted one is refused (MLflow would
    refuse to log into it, and a search of it finds nothing)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"experiment {name!r} is deleted; restore it with `mlflow experiments restore "
                          f"--experiment-id {experiment.experiment_id}` or name another experiment")
    return experiment


def local_path(uri: str) -> Path | None:
    """The file behind a local store or artifact URI; None for servers and object stores."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        return Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0]))
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path
        return Path(uri)
    return None


def _check_writable(path: Path, what: str) -> None:

    if not os.access(existing_ancestor(path), os.W_OK):
        raise ConfigError(f"{what} ({path}) is not writable by this user; fix its permissions or point "
                          f"MLFLOW_TRACKING_URI elsewhere")


def redact(uri: str) -> str:
    """Passwords in URLs never reach params, tags or messages."""

    return mask(uri)


class MetricsRefused(ConfigError):
    """The tracking server did not take metrics after MLflow's retries: the run must not end FINISHED."""


class MlflowLogger:
    """The loop's logger. Sends in a background thread so a slow tracking server never stalls a
    training step, and keeps each send's outcome: a batch the server still refuses after MLflow's
    HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, ..._BACKOFF_FACTOR) raises `MetricsRefused` at the
    next log or flush. The run then ends FAILED, and since a checkpoint is written only after a
    flush, it never claims the refused steps: `--resume-run-id` trains them again and logs them.

    Not `mlflow.log_metrics(synchronous=False)`: with MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS set,
    MLflow merges queued calls into one request and reports a failure only to the first call's
    future (mlflow/utils/async_logging/run_batch.py, `complete`), so the others look delivered.

    `logged` (key -> steps the server holds) keeps each step once when a resumed run repeats the
    steps after its checkpoint, and fills the gaps a refused batch left."""

    def __init__(self, run_id: str, logged: dict[str, set[int]] | None = None, resumable: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.run_id = run_id
        self.resumable = resumable  # checkpoints are written, so `--resume-run-id` can redo the refused steps
        self.logged = logged or {}
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")  # in order, one at a time
        self._pending: list[tuple[int, Any]] = []  # (step, future), oldest first

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        import time

        signals.raise_if_interrupted()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if v is not None and math.isfinite(float(v)) and step not in self.logged.get(k, ())]
        if batch:
            client = mlflow.MlflowClient()
            self._pending.append((step, self._sender.submit(client.log_batch, self.run_id, metrics=batch,
                                                                synchronous=True)))
        while self._pending and self._pending[0][1].done():  # fail at the first refusal, not at the next flush
            self._check([self._pending.pop(0)])

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._check(pending)

    def _check(self, sent: list[tuple[int, Any]]) -> None:
        refused = [(step, future.exception()) for step, future in sent if future.exception() is not None]
        if not refused:
            return
        self._sender.shutdown(wait=False, cancel_futures=True)  # the run is failing: spare the server the rest
        self._pending = []
        if not isinstance(refused[0][1], mlflow.exceptions.MlflowException):
            raise refused[0][1]  # a fault of ours, not the server's answer
        steps = sorted({step for step, _ in refused})
        which = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        reason = redact(str(refused[0][1]).splitlines()[0])[:300]
        then = (f"its checkpoint claims no step from there on: resume it with --resume-run-id {self.run_id} once "
                f"the server takes requests again" if self.resumable else
                "it wrote no checkpoints (--checkpoint-dir ''): start it again once the server takes requests")
        raise MetricsRefused(f"the tracking server refused the metrics of {which} of run {self.run_id} after "
                             f"MLflow's retries ({reason}); the run ends FAILED and {then}")


def logged_steps(run_id: str) -> dict[str, set[int]]:
    """Per metric key, the steps the server holds for a run."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    return {key: {m.step for m in client.get_metric_history(run_id, key)} for key in run.data.metrics}


def check_resumable(run_id: str) -> None:

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"run {run_id} does not exist on {redact(mlflow.get_tracking_uri())}") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} already FINISHED; nothing to resume")


@contextlib.contextmanager
def run(cfg: RunConfig, nested: bool = False, tags: dict[str, str] | None = None, name: str = "",
        killed_on: tuple[type[BaseException], ...] = (), resume_run_id: str = "") -> Iterator[mlflow.ActiveRun]:
    """Open (or, inside `mlflow run`, resume) the run; always close it with the true status.

    FINISHED on success, KILLED on Ctrl-C, SIGTERM or an exception in `killed_on` (an Optuna
    prune), FAILED with the traceback as an artifact on any other error: never left RUNNING.
    """
    inside_project = bool(os.environ.get("MLFLOW_RUN_ID")) and not nested
    previous = signals.catch_sigterm()
    outer = mlflow.active_run()
    active = None
    try:
        # Opened inside the try: a Ctrl-C in the instant after the run is created still closes it.
        if resume_run_id:
            # back to RUNNING, same id, same history
            active = mlflow.start_run(run_id=resume_run_id, log_system_metrics=cfg.tracking.system_metrics)
        else:
            if not inside_project and not nested:
                mlflow.set_experiment(cfg.tracking.experiment_name)
            derived = not (name or cfg.tracking.run_name)
            name = name or cfg.tracking.run_name or cfg.default_run_name()
            # Tags go in with the creation itself: a process killed a moment later leaves a run that
            # still says which study and trial it belongs to, so a restarted worker can close it.
            active = mlflow.start_run(run_name=None if inside_project else name, nested=nested,
                                      log_system_metrics=cfg.tracking.system_metrics,
                                      tags=None if inside_project else tags)
            if derived and _name_taken(active, name):
                name = f"{name}-e{cfg.train.epochs}"  # e.g. the same recipe trained longer
            mlflow.set_tags({"mlflow.runName": name, **(tags or {})})
        mark_model_training(active.info.experiment_id)
        yield active
        signals.raise_if_interrupted()  # never FINISHED after a SIGTERM whose exception Python dropped
    except (KeyboardInterrupt, *killed_on):
        signals.forget_interrupts()
        _close(_opened(active, outer), "KILLED")
        raise
    except BaseException:
        opened = _opened(active, outer)
        if opened is not None:  # without a run of ours, log_text would start one
            with contextlib.suppress(Exception):
                mlflow.log_text(scrub(traceback.format_exc()), "error/traceback.txt")
        _close(opened, "FAILED")
        raise
    else:
        _close(active, "FINISHED")
    finally:
        signals.restore_sigterm(previous)


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as model training (a kind someone chose, not one MLflow inferred, is left as
    it is), and give it a saved view of the runs table that shows the results: MLflow's UI keeps
    columns in the browser, but opens a view stored in an experiment tag from a link (`ui_link`)."""
    import json
    import time

    client = mlflow.MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    kind = tags.get(EXPERIMENT_KIND, "")
    if kind != MODEL_TRAINING and (not kind or kind.endswith("_inferred") or kind == "no_inferred_type"):
        _tag_experiment(client, experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    view = f"mlflow.sharedViewState.{RESULTS_VIEW}"
    if view not in tags:  # once: a view its users changed stays theirs
        state = json.dumps({"selectedColumns": list(RESULTS_COLUMNS)})
        _tag_experiment(client, experiment_id, view, json.dumps(
            {"name": "Results", "createdAt": int(time.time() * 1000), "state": state}))


def _tag_experiment(client, experiment_id: str, key: str, value: str) -> None:
    """MLflow's SQL store looks for the tag, then inserts it: when workers that start together set it
    at the same moment, PostgreSQL refuses all inserts but one. The tag being there is what counts."""
    try:
        client.set_experiment_tag(experiment_id, key, value)
    except mlflow.exceptions.MlflowException:
        if key not in client.get_experiment(experiment_id).tags:
            raise


def ui_link(experiment_id: str) -> str:
    """Where the experiment's runs list opens in the MLflow UI with the results' columns shown (its
    runs, not the GenAI overview MLflow 3 shows without `workflowType`): on the tracking server, or on
    `mlflow ui` for a local store."""
    from urllib.parse import urlsplit

    uri = mlflow.get_tracking_uri()
    page = f"#/experiments/{experiment_id}/runs?{RUNS_VIEW}&viewStateShareKey={RESULTS_VIEW}"
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)  # never the user info: it may be a credential
        bare = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()
        return f"{bare.rstrip('/')}/{page}"
    store = local_path(uri)
    default = store is not None and store.resolve() == (Path.cwd() / "mlflow.db").resolve()
    how = "mlflow ui" if default else f"mlflow ui --backend-store-uri {uri}"
    return f"http://127.0.0.1:5000/{page} (after `{how}`)"


def _name_taken(active: mlflow.ActiveRun, name: str) -> bool:
    others = mlflow.MlflowClient().search_runs(
        [active.info.experiment_id], f"attributes.run_name = '{name}'", max_results=2)
    return any(r.info.run_id != active.info.run_id for r in others)


def _opened(active, outer):
    """The run this context opened: `active`, or, if an interrupt came between MLflow starting it
    and the assignment, the active run when it is not the one that was active before."""
    if active is not None:
        return active
    current = mlflow.active_run()
    if current is not None and (outer is None or current.info.run_id != outer.info.run_id):
        return current
    return None


def _close(active: mlflow.ActiveRun | None, status: str) -> None:
    if active is None:
        return
    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()
    if mlflow.active_run() and mlflow.active_run().info.run_id == active.info.run_id:
        mlflow.end_run(status)


def log_setup(cfg: RunConfig, splits, counts: dict[str, Any], runtime: dict[str, Any], resumed: bool = False,
              tokenizer=None) -> dict[str, str]:
    """The run's params are the model's definition: the settings that change what is trained (`param`
    in config.py), its parameter counts and the data's sizes. Where it ran (`runtime.*`) and what the
    data check found (`data.*`) are tags; every resolved setting is in `config/resolved_config.yaml`,
    so the run can be reproduced from what it logged. Settings already logged by `mlflow run -P` are
    skipped, not re-logged: MLflow refuses a second value for a key ("5e-4" vs 0.0005 would clash).
    Returns the data-contract tags it set."""
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    existing = client.get_run(run_id).data.params
    dataset = dataset_name(cfg)
    values = {**cfg.params(), **counts, "num_labels": len(splits.labels), "train_size": len(splits.train),
              "val_size": len(splits.val), "test_size": len(splits.test), "dataset": dataset}
    fresh = {k: str(v) for k, v in values.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)
    mlflow.set_tags({STRATEGY: cfg.model.strategy, "model": cfg.model.model, "dataset": dataset,
                     **{f"runtime.{k}": str(v) for k, v in runtime.items()},
                     "data.test_texts_in_train": str(splits.test_in_train),
                     "data.duplicate_train_texts": str(splits.duplicate_train_texts),
                     "data.conflicting_train_texts": str(splits.conflicting_train_texts)})
    contract = log_contract(splits, cfg.data.split_seed, tokenizer)
    mlflow.log_dict(cfg.flat(), "config/resolved_config.yaml")
    mlflow.log_dict({"id2label": dict(enumerate(splits.labels))}, "config/label_map.json")
    if not resumed:  # a resumed run logged its inputs when it started
        for context in ("train", "validation", "test"):
            with _dataset_notes():
                mlflow.log_input(mlflow_dataset(cfg, splits, context), context=context)
    return contract


def dataset_name(cfg: RunConfig) -> str:
    return Path(cfg.data.train_data).name if cfg.data.train_data else cfg.data.dataset


def split_name(cfg: RunConfig, context: str) -> str:
    """What MLflow names a split's dataset: the file it came from (`train`, `test`), validation after
    the file it was carved from (`train-validation`); hub data `imdb`, `imdb-validation`, `imdb-test`."""
    if cfg.data.train_data:
        stem = Path(cfg.data.test_data if context == "test" else cfg.data.train_data).stem
        return f"{stem}-validation" if context == "validation" else stem
    return cfg.data.dataset if context == "train" else f"{cfg.data.dataset}-{context}"


def mlflow_dataset(cfg: RunConfig, splits, context: str):
    """One split ("train", "validation", "test") as an MLflow dataset: its digest, schema and source
    (the local file, or the hub dataset and split)."""
    df = {"train": splits.train, "validation": splits.val, "test": splits.test}[context]
    where = splits.test_source if context == "test" else splits.train_source
    source = where
    if not cfg.data.train_data:
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        name, split = where.rsplit(":", 1)
        source = HuggingFaceDatasetSource(path=name, split=split)
    with _dataset_notes():
        return mlflow.data.from_pandas(df, source=source, name=split_name(cfg, context), targets="label")


@contextlib.contextmanager
def _dataset_notes():
    """Two notes MLflow raises wherever a dataset is made or its schema inferred, neither of which
    applies here: the integer-column hint (labels are never missing) and a local file path being
    "interpretable in multiple ways" (both readings are the same local file)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple",
                                category=UserWarning)
        yield


def link_to_model(model_id: str, metrics: dict[str, float], cfg: RunConfig, splits, split: str) -> None:
    """The held-out metrics again, linked to the logged model and to the split's dataset: MLflow 3
    shows them on the model's page and in the run's Models tab. MLflow logs them through the run, so
    the run's history of each holds a second point with the same value."""
    with _dataset_notes():
        dataset = mlflow_dataset(cfg, splits, "test" if split == "test" else "validation")
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, model_id=model_id,
                           dataset=dataset)


def log_contract(splits, split_seed: int, tokenizer=None) -> dict[str, str]:
    """The data-contract tags (`data_contract`) set on the active run; returns them."""
    contract = data_contract(splits, split_seed, tokenizer)
    mlflow.set_tags(contract)
    return contract


def logged_config(run_id: str) -> dict[str, Any]:
    """Every resolved setting a run logged (`config/resolved_config.yaml`), read as plain YAML; the
    settings it may not name any more are dropped, those it does not name yet take their defaults."""
    import yaml

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/config/resolved_config.yaml")
    values = yaml.safe_load(text) or {}
    known = {f.name for f in all_fields()}
    return {k: v for k, v in values.items() if k in known}


def data_contract(splits, split_seed: int, tokenizer=None) -> dict[str, str]:
    """What a model was trained on, as tags: one fingerprint per split, the split seed, the label
    map and the tokenizer's hash; the registered model carries the last two and checks them."""
    import json

    tags = {f"data.fingerprint.{name}": fingerprint(df)
            for name, df in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    tags.update({"data.split_seed": str(split_seed), "data.label_map": json.dumps(splits.labels)})
    if tokenizer is not None:
        tags["tokenizer.hash"] = tokenizer_hash(tokenizer)
    return tags


HEADLINE_FIGURES = ("confusion_matrix.png", "roc_curve.png")


def log_evaluation(split: str, ev, names: list[str], texts: list[str] | None = None,
                   prefix: str = "", lengths=None, max_length: int = 0,
                   temperature: float = 1.0, headline: bool = False) -> dict[str, float]:
    """Metrics as `<split>/<prefix><name>`; artifacts under `<split>/`: confusion matrix (PNG and
    JSON), ROC curve, reliability diagram, classification report and, given texts, the most confident
    mistakes; given token lengths, metrics per length slice and per class. With `headline`, the
    confusion matrix and ROC curve also go to the top level, the only files MLflow's compare page
    shows side by side.

    With a temperature other than 1 the metrics are those of the calibrated probabilities (what the
    served model returns), and `ece_uncalibrated` / `brier_uncalibrated` keep the raw ones."""

    values = evaluate.metrics(ev, len(names))
    extra = {}
    if temperature != 1.0:
        extra = {"ece_uncalibrated": values["ece"], "brier_uncalibrated": values["brier"]}
        ev = evaluate.calibrated(ev, temperature)
        values = evaluate.metrics(ev, len(names))
    logged = {**values, **evaluate.per_class(ev, names), **extra}
    mlflow.log_metrics({f"{split}/{prefix}{k}": v for k, v in logged.items() if math.isfinite(v)})
    cm = evaluate.confusion(ev, len(names))
    mlflow.log_dict({"labels": names, "matrix": cm.tolist()}, f"{split}/confusion_matrix.json")
    figures = [(evaluate.confusion_figure(cm, names, f"{split} confusion matrix"), "confusion_matrix.png"),
               (evaluate.roc_figure(ev, names, f"{split} ROC"), "roc_curve.png"),
               (evaluate.reliability_figure(ev, f"{split} reliability"), "reliability.png")]
    slices = None
    if lengths is not None and max_length:
        slices = evaluate.length_slices(lengths, max_length)
        table = evaluate.slice_table(ev, slices, names)
        mlflow.log_table(table, f"{split}/slices.json")
        figures.append((evaluate.slice_figure(table, f"{split} accuracy by slice"), "slices.png"))
    for fig, file in figures:
        mlflow.log_figure(fig, f"{split}/{file}")
        if headline and file in HEADLINE_FIGURES:
            mlflow.log_figure(fig, file)
    mlflow.log_dict(evaluate.report(ev, names), f"{split}/classification_report.json")
    if texts is not None:
        mlflow.log_table(evaluate.worst_errors(ev, texts, names, slices=slices), f"{split}/misclassified.json")
    return values


def log_fit(result) -> None:
    """Throughput of the training (steady-state samples/s, warm-up apart) and the selected epoch."""

    mlflow.log_metrics({**throughput(result), BEST_EPOCH: result.best_epoch})


def log_calibration(temperature: float) -> None:
    mlflow.log_metric("calibration/temperature", temperature)


def log_summary(cfg: RunConfig, model, outcome) -> str:
    """`summary.json` at the top level and the run's description (`mlflow.note.content`): the
    one-line result a user reads in the runs table; returns that line."""
    scored, split = (outcome.test, "test") if outcome.test else (outcome.val, "val")
    pct = 100 * outcome.trainable_params / max(outcome.total_params, 1)
    mlflow.log_dict({"strategy": cfg.model.strategy, "model": cfg.model.model,
                     "trainable_params": outcome.trainable_params, "total_params": outcome.total_params,
                     "trainable_pct": round(pct, 3), "best_epoch": outcome.best_epoch,
                     **{f"val_{k}": round(outcome.val[k], 4) for k in ("accuracy", "f1") if k in outcome.val},
                     **{f"test_{k}": round(outcome.test[k], 4) for k in ("accuracy", "f1") if k in outcome.test},
                     "train_seconds": round(outcome.train_seconds, 1)}, "summary.json")
    minutes = outcome.train_seconds / 60
    took = f"{minutes:.0f} min" if minutes >= 1 else f"{outcome.train_seconds:.0f} s"
    label = strategies.get(cfg.model.strategy).label(model, cfg.lora)
    line = (f"{label}: {split} acc {scored['accuracy']:.3f}, F1 {scored['f1']:.3f}, "
            f"{_count(outcome.trainable_params)} trainable ({pct:.3g}%), {took}")
    mlflow.set_tag("mlflow.note.content", line)
    return line


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def log_model(model, tokenizer, settings: dict[str, Any], train_hashes: set[str], base: str = ""):
    """The run's MLflow 3 logged model `model`, as a model from code (no pickle): what its strategy
    saves (full fine-tuning's weights; LoRA's adapter and head, a few MB), with the base named as
    `--model` named it where the strategy needs one. The sha256 of every file goes in the logged
    model's `model.files` tag (serving.py); the run's params are copied to it by MLflow. Returns the
    ModelInfo."""
    import json

    strategy = strategies.get(settings["strategy"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = root / "artifacts" / serving.WEIGHTS
        weights.mkdir(parents=True)
        strategy.save(model, weights)
        tokenizer.save_pretrained(weights)
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        labels = [config.id2label[i] for i in range(config.num_labels)]
        config = {"format": serving.FORMAT, **settings, "labels": labels}
        if strategy.needs_base:
            config["base"] = {"model": base, "sha256": serving.weights_digest(serving.base_folder(base))}
        kwargs = servable_model(root, config, train_hashes)
        files = json.dumps(serving.manifest(root))
        return mlflow.pyfunc.log_model(name=MODEL, tags={serving.MANIFEST_TAG: files}, model_type=strategy.name,
                                       **kwargs)


def servable_model(root: Path, config: dict[str, Any], train_hashes: set[str]) -> dict[str, Any]:
    """Beside `root/artifacts/weights`, the JSON files; checked to load; the arguments of
    `mlflow.pyfunc.log_model`/`save_model` for a model from code that ships only serving's modules."""
    import json
    import shutil

    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    artifacts = root / "artifacts"
    (artifacts / serving.CONFIG).write_text(json.dumps(config, indent=1))
    (artifacts / serving.TRAIN_TEXTS).write_text(json.dumps(sorted(train_hashes)))
    classifier = serving.TextClassifier()
    classifier.load(str(artifacts / serving.WEIGHTS), config)  # what is logged is checked to load
    example = pd.DataFrame({"text": ["a wonderful film", "a dull mess"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, classifier.classify(example["text"].tolist()))
    # Input typed "any": MLflow's schema enforcement would turn a null or a number into the string
    # "None" or "3" and score it; the classifier refuses them itself, with HTTP 400.
    signature.inputs = Schema([ColSpec(AnyType(), "text")])
    package = root / "code" / "src"  # the served model's code: serving's modules, not the trainer
    package.mkdir(parents=True)
    for name in serving.CODE:
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__).parents[1] / name, package / name)
    return {"python_model": str(Path(__file__).with_name("served_model.py")),
            "artifacts": {key: str(artifacts / key) for key in serving.FILES},
            "code_paths": [str(package)], "signature": signature, "input_example": example,
            "pip_requirements": serving.requirements()}


class Tracker:
    """The MLflow side of one training run, as the orchestration calls it (finetune.py). Rank 0 of a
    data-parallel job, and any single process, use this; the other ranks use `finetune.NullTracker`,
    the same calls logging nothing, so every rank runs the same code."""

    active = True
    run = staticmethod(run)
    setup = staticmethod(log_setup)
    fit = staticmethod(log_fit)
    evaluation = staticmethod(log_evaluation)
    calibration = staticmethod(log_calibration)
    model = staticmethod(log_model)
    link = staticmethod(link_to_model)
    summary = staticmethod(log_summary)

    @staticmethod
    def logger(run_id: str, resumed: bool, resumable: bool) -> MlflowLogger:
        return MlflowLogger(run_id, logged_steps(run_id) if resumed else None, resumable=resumable)
