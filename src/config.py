"""Typed settings: the single source of truth for every option's name, default and check.

One flat namespace across the groups, so a setting has the same name as dataclass field,
CLI flag (`--learning-rate` or `--learning_rate`), MLproject parameter and logged MLflow param.
Only the standard library is imported here: `--help` and bad arguments must answer instantly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("full", "lora")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial")
SELECTION_METRICS = ("accuracy", "f1", "loss")

# Learning rates per strategy when none is given. LoRA wants roughly 10x the full fine-tuning
# rate: on real IMDB with a pretrained MiniLM, LoRA r8 q/k/v reached .914 test accuracy at 5e-4
# but only .855 at the seed's 2e-5 (STACK_NOTES, "Accuracy on the real data").
DEFAULT_LEARNING_RATE = {"full": 5e-5, "lora": 5e-4}


class ConfigError(ValueError):
    """A setting is wrong; the message is one line saying what and how to fix it."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DataConfig:
    dataset: str = _opt("imdb", "Hub dataset name (used when --train-data is not given).")
    train_data: str = _opt("", "Local train file (.csv, .json/.jsonl, .parquet); overrides --dataset.")
    test_data: str = _opt("", "Local test file, required with --train-data.")
    text_column: str = _opt("text", "Column holding the text.")
    label_column: str = _opt("label", "Column holding the label (ints or strings).")
    val_fraction: float = _opt(0.1, "Fraction of train held out for validation (stratified).")
    split_seed: int = _opt(42, "Seed of the train/validation split and of the size caps.")
    max_train_samples: int = _opt(0, "Cap on train examples after the split (0 = all).")
    max_val_samples: int = _opt(0, "Cap on validation examples (0 = all).")
    max_test_samples: int = _opt(0, "Cap on test examples (0 = all).")
    max_length: int = _opt(512, "Longest tokenized input; longer texts are truncated.")

    def __post_init__(self) -> None:
        if self.test_data and not self.train_data:
            raise ConfigError("--test-data was given without --train-data; give both local files")
        if self.train_data and not self.test_data:
            raise ConfigError("--train-data needs --test-data too (the test split is never carved from train)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1 exclusive, got {self.val_fraction}")
        for name in ("max_train_samples", "max_val_samples", "max_test_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 = all), got {getattr(self, name)}")
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if not self.text_column or not self.label_column:
            raise ConfigError("--text-column and --label-column must not be empty")


@dataclass
class ModelConfig:
    model: str = _opt("distilbert-base-uncased", "Hub model name or local folder of an encoder.")
    strategy: str = _opt("lora", "What to train: 'full' (every weight) or 'lora' (adapters + head).",
                         choices=STRATEGIES)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not self.model:
            raise ConfigError("--model must name a hub model or a local folder")


@dataclass
class LoraConfig:
    lora_r: int = _opt(8, "LoRA rank.")
    lora_alpha: float = _opt(32.0, "LoRA scaling alpha (the update is scaled by alpha / r).")
    lora_dropout: float = _opt(0.1, "Dropout on the LoRA input.")
    lora_target_modules: str = _opt(
        "auto", "Comma-separated module names, 'all-linear', or 'auto' (per architecture: "
        "DistilBERT q_lin,k_lin,v_lin; BERT/RoBERTa query,key,value; ...).")

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ConfigError(f"--lora-r must be a positive integer, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not re.fullmatch(r"[\w.\-]+(,[\w.\-]+)*", self.lora_target_modules.replace(" ", "")):
            raise ConfigError(f"--lora-target-modules must be 'auto', 'all-linear' or names separated by "
                              f"commas, got {self.lora_target_modules!r}")

    def target_modules(self) -> list[str] | str | None:
        """None = resolve per architecture; 'all-linear' passes through to peft."""
        value = self.lora_target_modules.replace(" ", "")
        if value == "auto":
            return None
        if value == "all-linear":
            return value
        return value.split(",")


@dataclass
class TrainConfig:
    epochs: int = _opt(3, "Passes over the train split.")
    batch_size: int = _opt(32, "Training examples per optimizer micro-step.")
    eval_batch_size: int = _opt(128, "Examples per evaluation batch (sorted by length, no gradients).")
    learning_rate: float | None = _opt(None, "Peak learning rate; unset = strategy default (full 5e-5, lora 5e-4).",
                                       type=float)
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = _opt(0.06, "Fraction of optimizer steps spent warming the learning rate up.")
    lr_scheduler: str = _opt("linear", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).")
    precision: str = _opt("auto", "auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.",
                          choices=PRECISIONS)
    seed: int = _opt(42, "Seed for initialisation, dropout and batch order.")
    selection_metric: str = _opt("accuracy", "Validation metric that picks the best epoch and early-stops.",
                                 choices=SELECTION_METRICS)
    early_stopping_patience: int = _opt(0, "Stop after this many epochs without validation improvement (0 = off).")
    logging_steps: int = _opt(10, "Log the mean training loss every this many optimizer steps.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.learning_rate is not None and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be >= 0 (0 = off), got {self.max_grad_norm}")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"--early-stopping-patience must be >= 0, got {self.early_stopping_patience}")
        for name, allowed in (("precision", PRECISIONS), ("lr_scheduler", SCHEDULERS),
                              ("selection_metric", SELECTION_METRICS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")


@dataclass
class TrackingConfig:
    experiment_name: str = _opt("imdb-sentiment", "MLflow experiment (ignored inside `mlflow run`, "
                                "which chooses it).")
    run_name: str = _opt("", "MLflow run name; empty = derived, e.g. lora-r8-a32-lr5e-4.")
    registered_model_name: str = _opt("", "If set, log a servable model and register it under this name.")

    def __post_init__(self) -> None:
        name = self.registered_model_name
        if name and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", name):
            raise ConfigError(f"--registered-model-name may hold letters, digits, '_', '-', '.', got {name!r}")


GROUPS = (DataConfig, ModelConfig, LoraConfig, TrainConfig, TrackingConfig)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> RunConfig:
        """Build from one flat mapping of setting name -> value (CLI, MLproject, tests)."""
        known = {f.name: group for group in GROUPS for f in dataclasses.fields(group)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        parts = {}
        for attr, group in zip(("data", "model", "lora", "train", "tracking"), GROUPS, strict=True):
            names = {f.name for f in dataclasses.fields(group)}
            parts[attr] = group(**{k: v for k, v in values.items() if k in names})
        return cls(**parts)

    @property
    def learning_rate(self) -> float:
        if self.train.learning_rate is None:
            return DEFAULT_LEARNING_RATE[self.model.strategy]
        return self.train.learning_rate

    def flat(self) -> dict[str, Any]:
        """Every resolved setting once, by its one name; LoRA settings only for LoRA runs."""
        out: dict[str, Any] = {}
        for attr in ("data", "model", "lora", "train", "tracking"):
            if attr == "lora" and self.model.strategy != "lora":
                continue
            out.update(dataclasses.asdict(getattr(self, attr)))
        out["learning_rate"] = self.learning_rate
        return out

    def default_run_name(self) -> str:
        lr = f"{self.learning_rate:.0e}".replace("e-0", "e-")
        if self.model.strategy == "lora":
            return f"lora-r{self.lora.lora_r}-a{self.lora.lora_alpha:g}-lr{lr}"
        return f"full-lr{lr}"


def all_fields() -> list[dataclasses.Field]:
    return [f for group in GROUPS for f in dataclasses.fields(group)]
