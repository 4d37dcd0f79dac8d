"""Names that one module writes and another reads: MLflow metric keys, tags, artifact paths and
registry aliases. Written once here, so a writer and its readers cannot drift apart. Standard
library only: every layer may import it."""

from __future__ import annotations

# Registry aliases: the served model, the runner-up, and where a rollback returns to.
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"

# Artifact folders of a training run: the LoRA adapter, or full fine-tuning's weights (both
# safetensors). A search's winner is rebuilt from them.
ADAPTER, WEIGHTS = "adapter", "weights"

# Tags of a run.
STRATEGY = "strategy"
STUDY, TRIAL, STORAGE_ID, TRIAL_STATE = "optuna.study", "optuna.trial", "optuna.storage_id", "optuna.state"
TRIAL_RUN_ID = "trial_run_id"  # on a registered version: the trial run that trained it

# Metrics of a training run. Validation and test metrics are `<split>/<name>`; `val/best_<name>` is
# the selected epoch's value (plain `val/<name>` is the per-epoch history).
TRAIN_LOSS, LEARNING_RATE, EPOCH = "train/loss", "train/learning_rate", "train/epoch"
RUNTIME_S, WARMUP_S = "train/runtime_s", "train/warmup_s"
SAMPLES_PER_S, TOKENS_PER_S = "train/samples_per_s", "train/tokens_per_s"
PADDING_FRACTION, PEAK_MEMORY_MB = "train/padding_fraction", "train/peak_memory_mb"


def metric(split: str, name: str, best: bool = False) -> str:
    """`test/accuracy`, `val/accuracy` (per epoch) or, with best, `val/best_accuracy`."""
    return f"{split}/{'best_' if best else ''}{name}"
