"""Names that one module writes and another reads: MLflow metric keys, tags, artifact paths and
registry aliases. Written once here, so a writer and its readers cannot drift apart. Standard
library only: every layer may import it."""

from __future__ import annotations

# Registry aliases: the served model, the runner-up, and where a rollback returns to.
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"

# The MLflow 3 logged model of every training run (`models:/m-...`, `runs:/<run id>/model`).
MODEL = "model"
# Experiment tag: the MLflow UI's kind of experiment (model training, not GenAI); the URL parameter
# that opens an experiment on its runs list; the saved view of the runs table (an experiment tag
# `mlflow.sharedViewState.<key>`, opened by `viewStateShareKey=<key>`) and the columns it shows.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
RUNS_VIEW = "workflowType=machine_learning"
RESULTS_VIEW = "results"
RESULTS_COLUMNS = ("attributes.`Models`", "metrics.`test/accuracy`", "metrics.`test/f1`",
                   "metrics.`val/best_accuracy`", "params.`trainable_pct`", "params.`trainable_params`")

# Tags of a run.
STRATEGY = "strategy"
STUDY, TRIAL, STORAGE_ID, TRIAL_STATE = "optuna.study", "optuna.trial", "optuna.storage_id", "optuna.state"

# Metrics of a training run. Validation and test metrics are `<split>/<name>`; `val/best_<name>` is
# the selected epoch's value (plain `val/<name>` is the per-epoch history).
TRAIN_LOSS, LEARNING_RATE, EPOCH = "train/loss", "train/learning_rate", "train/epoch"
RUNTIME_S = "train/runtime_s"
BEST_EPOCH = "val/best_epoch"  # the epoch selected on validation
SAMPLES_PER_S, TOKENS_PER_S = "train/samples_per_s", "train/tokens_per_s"
PADDING_FRACTION, PEAK_MEMORY_MB = "train/padding_fraction", "train/peak_memory_mb"


# Each metric that may select the best epoch, early-stop and rank tuning trials, with its direction:
# selection, pruning and the search all read it here.
DIRECTION = {"accuracy": "max", "f1": "max", "roc_auc": "max", "loss": "min", "ece": "min", "brier": "min"}


def better(name: str, new: float, old: float | None) -> bool:
    """Is `new` an improvement on `old` (None: nothing yet) for metric `name`?"""
    if old is None:
        return True
    return new < old if DIRECTION[name] == "min" else new > old


def metric(split: str, name: str, best: bool = False) -> str:
    """`test/accuracy`, `val/accuracy` (per epoch) or, with best, `val/best_accuracy`."""
    return f"{split}/{'best_' if best else ''}{name}"
