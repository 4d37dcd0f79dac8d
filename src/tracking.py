"""Every MLflow call of a training run (naming, params, metrics, figures, lineage, models) and the
checks every command shares (reachability, experiments).

Other modules call MLflow for their own kind of record, each saying so in its docstring: registry.py
(the Model Registry), serving.py (reading model files), tune.py (a search's parent run and its trials' tags),
compare.py (reading runs; the report's run), serve.py (a local copy of a model for `mlflow models
serve`), cli.py (a refused `mlflow run` marked FAILED).

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

from . import signals
from .config import ConfigError, RunConfig
from .names import STRATEGY


def check_reachable(timeout: float = 5.0) -> None:
    """A remote tracking server that is down should cost five seconds, not a training run: MLflow's
    own client would retry for minutes, and only after the model was trained. The probe is a real API
    call of MLflow's client, so its TLS (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS)
    and auth (MLFLOW_TRACKING_TOKEN, username/password, auth plugins) apply; retries and timeout are
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT when set, else none and `timeout`."""
    from mlflow.exceptions import MlflowException

    from .config import ConfigError

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
    from .checkpoint import existing_ancestor
    from .config import ConfigError

    if not os.access(existing_ancestor(path), os.W_OK):
        raise ConfigError(f"{what} ({path}) is not writable by this user; fix its permissions or point "
                          f"MLFLOW_TRACKING_URI elsewhere")


def redact(uri: str) -> str:
    """Passwords in URLs never reach params, tags or messages."""
    from .urls import mask

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
    from .config import ConfigError

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
                from .urls import scrub

                mlflow.log_text(scrub(traceback.format_exc()), "error/traceback.txt")
        _close(opened, "FAILED")
        raise
    else:
        _close(active, "FINISHED")
    finally:
        signals.restore_sigterm(previous)


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


def log_setup(cfg: RunConfig, splits, params: dict[str, Any], resumed: bool = False,
              tokenizer=None) -> dict[str, str]:
    """Params once each: settings already logged by `mlflow run -P` are skipped, not re-logged,
    because MLflow refuses a second value for a key ("5e-4" vs 0.0005 would clash). Returns the
    data-contract tags it set."""
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    existing = client.get_run(run_id).data.params
    values = {**cfg.flat(), **params, "num_labels": len(splits.labels),
              "train_size": len(splits.train), "val_size": len(splits.val), "test_size": len(splits.test),
              "test_texts_in_train": splits.test_in_train,
              "duplicate_train_texts": splits.duplicate_train_texts,
              "conflicting_train_texts": splits.conflicting_train_texts}
    dataset = dataset_name(cfg)
    values["dataset"] = dataset  # what was used: the file, when files are given
    fresh = {k: str(v) for k, v in values.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)
    mlflow.set_tags({STRATEGY: cfg.model.strategy, "model": cfg.model.model, "dataset": dataset})
    contract = log_contract(splits, cfg.data.split_seed, tokenizer)
    mlflow.log_dict({**cfg.flat(), "learning_rate": cfg.learning_rate}, "config/resolved_config.yaml")
    mlflow.log_dict({"id2label": dict(enumerate(splits.labels))}, "config/label_map.json")
    if not resumed:  # a resumed run logged its inputs when it started
        for context in ("train", "validation", "test"):
            with _dataset_notes():
                mlflow.log_input(mlflow_dataset(cfg, splits, context), context=context)
    return contract


def dataset_name(cfg: RunConfig) -> str:
    return Path(cfg.data.train_data).name if cfg.data.train_data else cfg.data.dataset


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
        return mlflow.data.from_pandas(df, source=source, name=f"{dataset_name(cfg)}-{context}", targets="label")


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


def download(run_id: str, artifact_path: str, dst: str) -> str:
    """A run's artifact folder, downloaded under `dst`; returns its local path."""
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst)


def data_contract(splits, split_seed: int, tokenizer=None) -> dict[str, str]:
    """What a model was trained on, as tags: one fingerprint per split, the split seed, the label
    map and the tokenizer's hash; the registered model carries the last two and checks them."""
    import json

    from .data import fingerprint, tokenizer_hash

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
    from . import evaluate

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
    from .loop import throughput

    mlflow.log_metrics({**throughput(result), "best_epoch": result.best_epoch})


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
    line = (f"{strategy_label(cfg, model)}: {split} acc {scored['accuracy']:.3f}, F1 {scored['f1']:.3f}, "
            f"{_count(outcome.trainable_params)} trainable ({pct:.3g}%), {took}")
    mlflow.set_tag("mlflow.note.content", line)
    return line


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def strategy_label(cfg: RunConfig, model) -> str:
    """'LoRA r8 q_lin/k_lin/v_lin' (the modules peft adapted) or 'Full fine-tuning'."""
    if cfg.model.strategy != "lora":
        return "Full fine-tuning"
    targets = getattr(model, "peft_config", {}).get("default")
    modules = sorted(targets.target_modules) if targets is not None and targets.target_modules else []
    where = "/".join(modules) if modules else cfg.lora.lora_target_modules
    return f"LoRA r{cfg.lora.lora_r} {where}"


def log_trained(model, tokenizer, artifact_path: str) -> None:
    """The trained weights and the tokenizer, as `save_pretrained` writes them. For LoRA (`adapter/`)
    the adapter, its config and the trained head: a few MB, reloadable with
    `PeftModel.from_pretrained(base, <dir>)`; for full fine-tuning (`weights/`) the whole model, which
    a tuning study needs to register a full winner without training it again."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        mlflow.log_artifacts(tmp, artifact_path)


def log_servable(model, tokenizer, settings: dict[str, Any], train_hashes: set[str]):
    """Log a self-contained classifier as a model from code (LoRA merged, safetensors weights, JSON
    files; no pickle, no base model or network needed to load) in the active run. Not registered
    here: the promotion gate registers it with its evidence. Returns the ModelInfo."""
    from . import serving
    from .data import tokenizer_hash

    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    config = {"format": serving.FORMAT, **settings, "labels": labels, "tokenizer_hash": tokenizer_hash(tokenizer)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder / serving.WEIGHTS, safe_serialization=True)
        tokenizer.save_pretrained(folder / serving.WEIGHTS)
        return mlflow.pyfunc.log_model(name="model", **servable_model(folder, config, train_hashes))


def servable_model(folder: Path, config: dict[str, Any], train_hashes: set[str]) -> dict[str, Any]:
    """Beside `folder/weights`, the JSON files; checked to load; the arguments of
    `mlflow.pyfunc.log_model`/`save_model` for a model from code (no pickle)."""
    import json

    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    from . import serving

    (folder / serving.CONFIG).write_text(json.dumps(config, indent=1))
    (folder / serving.TRAIN_TEXTS).write_text(json.dumps(sorted(train_hashes)))
    classifier = serving.TextClassifier()
    classifier.load(str(folder / serving.WEIGHTS), config)  # what is logged is checked to load
    example = pd.DataFrame({"text": ["a wonderful film", "a dull mess"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, classifier.classify(example["text"].tolist()))
    # Input typed "any": MLflow's schema enforcement would turn a null or a number into the string
    # "None" or "3" and score it; the classifier refuses them itself, with HTTP 400.
    signature.inputs = Schema([ColSpec(AnyType(), "text")])
    return {"python_model": str(Path(__file__).with_name("served_model.py")),
            "artifacts": {key: str(folder / key) for key in (serving.WEIGHTS, serving.CONFIG, serving.TRAIN_TEXTS)},
            "code_paths": [str(Path(__file__).parent)], "signature": signature, "input_example": example,
            "pip_requirements": serving.requirements()}
