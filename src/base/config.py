"""Typed settings: the single source of truth for every option's name, default and check.

One flat namespace across the groups, so a setting has the same name as dataclass field,
CLI flag (`--learning-rate` or `--learning_rate`), MLproject parameter and logged MLflow param.
Only the standard library is imported here: `--help` and bad arguments must answer instantly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .names import DIRECTION
from .strategies import DEFAULT_LEARNING_RATE, STRATEGIES
from .urls import backend, mask, unencoded_at

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial")
SELECTION_METRICS = tuple(DIRECTION)  # each with its direction, declared in names.py
EMPTY_TEXTS = ("fail", "drop")

DEFAULT_PROMOTION_ALPHA = 0.05  # a registered model's promotion level until its owner sets one
# Fewest distinct held-out texts whose evidence may promote: below it a paired test says little.
DEFAULT_PROMOTION_MIN_TEXTS = 100
DEFAULT_EXPERIMENT = "imdb-sentiment"  # where training runs go, and where compare reads
DEFAULT_REGISTERED_MODEL = "imdb-sentiment"  # what a search registers, and whose champion compare marks


def _opt(default: Any, help: str, *, param: bool = True, may_change: bool = False, **extra: Any) -> Any:
    """A setting. `param`: it defines the trained model (data, model, strategy, LoRA, optimisation,
    seeds) and is logged as an MLflow param; operational settings (where it runs, how it reports) live
    in the run's `config/resolved_config.yaml` only. `may_change`: a resumed run may give it another value."""
    return field(default=default, metadata={"help": help, "param": param, "may_change": may_change, **extra})


OPERATIONAL = {"param": False}
RESUMABLE = {"param": False, "may_change": True}  # operational, and free to change on resume


def _check_seed(name: str, value: int) -> None:
    """NumPy and scikit-learn take seeds in [0, 2**32) and fail with a traceback otherwise."""
    if not 0 <= value < 2**32:
        raise ConfigError(f"--{name.replace('_', '-')} must be an integer from 0 to {2**32 - 1}, got {value}")


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
    empty_texts: str = _opt("fail", "Rows whose text is empty or not a string: 'fail' with their count, or 'drop' "
                            "them with a warning.", choices=EMPTY_TEXTS)

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
        if self.empty_texts not in EMPTY_TEXTS:
            raise ConfigError(f"--empty-texts must be one of {', '.join(EMPTY_TEXTS)}, got {self.empty_texts!r}")
        if not self.text_column or not self.label_column:
            raise ConfigError("--text-column and --label-column must not be empty")
        if self.text_column == self.label_column:
            raise ConfigError(f"--text-column and --label-column both name column {self.text_column!r}; the label "
                              f"needs its own column")
        _check_seed("split_seed", self.split_seed)


@dataclass
class ModelConfig:
    model: str = _opt("distilbert-base-uncased", "Hub model name or local folder of an encoder.")
    strategy: str = _opt("lora", "What to train: " + "; ".join(f"'{s.name}' ({s.title})" for s in STRATEGIES.values())
                         + ".", choices=tuple(STRATEGIES))
    attention_dropout: float = _opt(
        0.0, "Dropout on the attention probabilities, set in the model's config whatever it calls it "
        "(0.1 in DistilBERT/BERT checkpoints). 0 lets PyTorch use its fused attention kernels: 2.1x faster "
        "training steps at 512 tokens on CPU.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"--attention-dropout must be in [0, 1), got {self.attention_dropout}")
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
        "auto", "'auto' = attention q/k/v per architecture (DistilBERT q_lin,k_lin,v_lin; BERT/RoBERTa "
        "query,key,value; ...), 'attention-output' = those + the attention output, 'all-linear', "
        "or comma-separated module names.")

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


@dataclass
class TrainConfig:
    epochs: int = _opt(3, "Passes over the train split.")
    batch_size: int = _opt(32, "Training examples per optimizer micro-step.")
    eval_batch_size: int = _opt(128, "Examples per evaluation batch (sorted by length, no gradients).", **RESUMABLE)
    learning_rate: float | None = _opt(None, "Peak learning rate; unset = the strategy's default ("
                                       + ", ".join(f"{s} {lr:g}" for s, lr in DEFAULT_LEARNING_RATE.items()) + ").",
                                       type=float)
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = _opt(0.06, "Fraction of optimizer steps spent warming the learning rate up.")
    lr_scheduler: str = _opt("linear", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).")
    precision: str = _opt("auto", "auto = bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX), "
                          "else fp16 on GPU, fp32 on CPU.",
                          choices=PRECISIONS)
    bucket_width: int = _opt(0, "Pad every batch to a multiple of this many tokens (at most the longest "
                             "text), batching texts of one width together, so steps take a few fixed shapes "
                             "(faster on GPU, benchmarks/README.md). 0 = length-grouped batches padded to their "
                             "longest text (evaluation on a GPU still rounds widths to 64).")
    device: str = _opt("auto", "Where to train: 'auto' = this process's GPU (cuda:$LOCAL_RANK under torchrun or "
                       "accelerate launch, else the first GPU that CUDA_VISIBLE_DEVICES leaves visible), else the CPU; "
                       "or 'cpu', 'cuda', 'cuda:N', 'mps'. One tuning worker per GPU: "
                       "--device cuda:N or CUDA_VISIBLE_DEVICES=N.", **RESUMABLE)
    dist_timeout: int = _opt(1800, "Seconds a process of torchrun / accelerate launch waits at a collective "
                             "(gradient all-reduce, gathering predictions) before the job fails.", **RESUMABLE)
    seed: int = _opt(42, "Seed for initialisation, dropout and batch order.")
    selection_metric: str = _opt("accuracy", "Validation metric that picks the best epoch and early-stops.",
                                 choices=SELECTION_METRICS)
    early_stopping_patience: int = _opt(0, "Stop after this many epochs without validation improvement (0 = off).")
    logging_steps: int = _opt(10, "Log the mean training loss every this many optimizer steps and at the end of "
                                  "each epoch.", **RESUMABLE)
    checkpoint_dir: str = _opt("checkpoints", "Checkpoints go to <dir>/<run id>/last.pt after every epoch and on "
                               "Ctrl-C/SIGTERM; removed when the run finishes. Empty = none.", **OPERATIONAL)
    checkpoint_steps: int = _opt(0, "Also checkpoint every this many optimizer steps (0 = per epoch only).",
                                 **RESUMABLE)
    class_weights: str = _opt("", "Weights of the classes in the training loss: empty = equal, 'balanced' = "
                              "inverse to their train frequency, or one number per label in label order (e.g. 1,4).")
    temperature_scaling: bool = _opt(False, "Fit a softmax temperature on validation after training; test "
                                     "metrics, predict and serve then use the calibrated probabilities.", type=bool,
                                     may_change=True)

    def loss_weights(self, counts: list[int]) -> list[float] | None:
        """Per-class loss weights from the train count of each label 0..K-1 (None = unweighted)."""
        if not self.class_weights:
            return None
        if self.class_weights == "balanced":
            return [sum(counts) / (len(counts) * max(1, n)) for n in counts]
        weights = _floats(self.class_weights, "class_weights")
        if len(weights) != len(counts):
            raise ConfigError(f"--class-weights gives {len(weights)} weight(s) for {len(counts)} labels; give one "
                              f"per label, in label order")
        return weights

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
        if self.checkpoint_steps < 0:
            raise ConfigError(f"--checkpoint-steps must be >= 0, got {self.checkpoint_steps}")
        _check_seed("seed", self.seed)
        if self.bucket_width < 0:
            raise ConfigError(f"--bucket-width must be >= 0 (0 = off), got {self.bucket_width}")
        if self.dist_timeout < 1:
            raise ConfigError(f"--dist-timeout must be at least 1 second, got {self.dist_timeout}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"--early-stopping-patience must be >= 0, got {self.early_stopping_patience}")
        if self.class_weights not in ("", "balanced"):
            weights = _floats(self.class_weights, "class_weights")
            if len(weights) < 2 or not all(w > 0 and math.isfinite(w) for w in weights):
                raise ConfigError(f"--class-weights must be empty, 'balanced' or positive numbers separated by "
                                  f"commas (one per label), got {self.class_weights!r}")
        for name, allowed in (("precision", PRECISIONS), ("lr_scheduler", SCHEDULERS),
                              ("selection_metric", SELECTION_METRICS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")


@dataclass
class TrackingConfig:
    experiment_name: str = _opt(DEFAULT_EXPERIMENT, "MLflow experiment (ignored inside `mlflow run`, "
                                "which chooses it).", **OPERATIONAL)
    run_name: str = _opt("", "MLflow run name; empty = derived, e.g. lora-r8-a32-lr5e-4.", **OPERATIONAL)
    registered_model_name: str = _opt("", "If set, the run's logged model goes through the promotion gate and, "
                                      "if it passes, is registered under this name.", **RESUMABLE)
    resume_run_id: str = _opt("", "Continue this interrupted run (same MLflow run) from its checkpoint in "
                              "--checkpoint-dir, with the same settings.", **RESUMABLE)
    promotion_alpha: float = _opt(DEFAULT_PROMOTION_ALPHA, "Significance level of the promotion gate: a "
                                  "registered model becomes champion only if it beats the current one on the "
                                  "same held-out examples (McNemar p < alpha and a bootstrap interval of the gain "
                                  "above 0). The registered model's policy (`python -m src.registry policy`) is "
                                  "the loosest level allowed: only a stricter value here has an effect.", **RESUMABLE)
    system_metrics: bool = _opt(False, "Also log the machine's CPU, memory, disk and network use (and the GPU's, with "
                                "nvidia-ml-py installed: the `gpu` extra) as `system/*` metrics of each run, sampled "
                                "every 10 s (MLflow's system metrics); off by default, so a run's metrics are its "
                                "results.", type=bool, **RESUMABLE)
    max_batch_size: int = _opt(1024, "Most texts the registered model scores in one request; a larger batch is "
                               "refused with HTTP 400 (0 = no limit).", **RESUMABLE)

    def __post_init__(self) -> None:
        if not self.experiment_name.strip():
            raise ConfigError(f"--experiment-name must not be empty; name the MLflow experiment, e.g. "
                              f"{DEFAULT_EXPERIMENT}")
        name = self.registered_model_name
        if name and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", name):
            raise ConfigError(f"--registered-model-name may hold letters, digits, '_', '-', '.', got {name!r}")
        if not 0.0 < self.promotion_alpha < 1.0:
            raise ConfigError(f"--promotion-alpha must be between 0 and 1 exclusive, got {self.promotion_alpha}")
        if self.max_batch_size < 0:
            raise ConfigError(f"--max-batch-size must be 0 (no limit) or more, got {self.max_batch_size}")
        if self.resume_run_id and not re.fullmatch(r"[0-9a-f]{32}", self.resume_run_id):
            raise ConfigError(f"--resume-run-id must be an MLflow run id (32 hex digits), got {self.resume_run_id!r}")


GROUPS = (DataConfig, ModelConfig, LoraConfig, TrainConfig, TrackingConfig)

PRUNERS = ("median", "hyperband", "none")
TARGET_SETS = ("auto", "attention-output", "all-linear")
OBJECTIVES = ("metric", "metric,trainable_params", "metric,train_seconds")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} must be numbers separated by commas, got {text!r}") from None


@dataclass
class TuneConfig:
    """The Optuna search over LoRA settings; every training setting passes through unchanged."""

    n_trials: int = _opt(20, "Finished trials (complete or pruned) the study should reach, counting earlier "
                         "invocations and other workers on the same storage.")
    study_name: str = _opt("imdb-lora", "Optuna study name; an existing study on the storage is resumed.")
    storage: str = _opt("", "Optuna storage: sqlite:///file.db, postgresql://..., mysql://..., or a journal file "
                        "path ending in .log; empty = $OPTUNA_STORAGE, else sqlite:///optuna.db. A URL holding a "
                        "password belongs in OPTUNA_STORAGE (not in this flag, and never in `mlflow run -P`).")
    sampler_seed: int = _opt(42, "Seed of the TPE sampler.")
    pruner: str = _opt("median", "Stops hopeless trials from their per-epoch validation metric.", choices=PRUNERS)
    search_space: str = _opt("", "YAML file with any of the keys below (lora_r_choices, ...); overrides the flags.")
    lora_r_choices: str = _opt("4,8,16,32", "Ranks to try.")
    lora_alpha_choices: str = _opt("8,16,32,64", "Alphas to try.")
    learning_rate_range: str = _opt("1e-4,2e-3", "Learning-rate range low,high (sampled log-uniformly).")
    lora_dropout_range: str = _opt("0.0,0.2", "Dropout range low,high.")
    target_module_choices: str = _opt("auto,all-linear", f"Target sets to try, from {', '.join(TARGET_SETS)}.")
    strategy_choices: str = _opt("lora", "Strategies the search may pick: 'lora', or 'full,lora' to weigh full "
                                 "fine-tuning against LoRA (full trials save their weights so a full winner can "
                                 "be registered).")
    full_learning_rate_range: str = _opt("1e-5,1e-4", "Learning-rate range of full fine-tuning trials.")
    objectives: str = _opt("metric", "'metric' = the validation selection metric alone; 'metric,trainable_params' "
                           "or 'metric,train_seconds' = a Pareto front of quality against cost (no pruning).",
                           choices=OBJECTIVES)
    evaluate_test: bool = _opt(True, "Evaluate the winner on the test split once, after selection.", type=bool)
    heartbeat_interval: int = _opt(60, "Seconds between trial heartbeats (RDB storages); a trial silent for "
                                   "twice as long is marked FAIL when a worker starts.")

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ConfigError(f"--n-trials must be at least 1, got {self.n_trials}")
        if not self.study_name:
            raise ConfigError("--study-name must not be empty")
        if self.objectives not in OBJECTIVES:
            raise ConfigError(f"--objectives must be one of {', '.join(OBJECTIVES)}, got {self.objectives!r}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.heartbeat_interval < 1:
            raise ConfigError(f"--heartbeat-interval must be at least 1 second, got {self.heartbeat_interval}")
        _check_seed("sampler_seed", self.sampler_seed)
        self.storage = self.storage or os.environ.get("OPTUNA_STORAGE") or "sqlite:///optuna.db"

        shown = mask(self.storage)  # also marks its password for scrubbing from any later message
        if unencoded_at(self.storage):
            raise ConfigError(f"--storage {shown!r} holds an unencoded '@' in its user or password; "
                              f"percent-encode it as %40 ('/' as %2F): urllib.parse.quote(password, safe='')")
        if not (self.storage.endswith(".log") or backend(self.storage) in ("sqlite", "postgresql", "mysql")):
            raise ConfigError(f"--storage {shown!r} is not supported; use sqlite:///file.db, "
                              f"postgresql://..., mysql://... or a journal file ending in .log")
        if self.search_space:
            self._apply_yaml(self.search_space)
        self.space()  # validates every range now, before any trial

    def _apply_yaml(self, path: str) -> None:
        import yaml

        try:
            values = yaml.safe_load(open(path)) or {}
        except OSError as exc:
            raise ConfigError(f"search space file {path!r} cannot be read ({exc.strerror})") from None
        keys = {"lora_r_choices", "lora_alpha_choices", "learning_rate_range", "lora_dropout_range",
                "target_module_choices", "strategy_choices", "full_learning_rate_range"}
        if not isinstance(values, dict) or set(values) - keys:
            raise ConfigError(f"search space file {path!r} may only hold the keys {', '.join(sorted(keys))}")
        for key, value in values.items():
            setattr(self, key, ",".join(map(str, value)) if isinstance(value, list) else str(value))

    def space(self) -> dict[str, list]:
        ranks = _floats(self.lora_r_choices, "lora_r_choices")
        alphas = _floats(self.lora_alpha_choices, "lora_alpha_choices")
        lr = _floats(self.learning_rate_range, "learning_rate_range")
        dropout = _floats(self.lora_dropout_range, "lora_dropout_range")
        full_lr = _floats(self.full_learning_rate_range, "full_learning_rate_range")
        strategies = [t for t in self.strategy_choices.replace(" ", "").split(",") if t]
        if not strategies or set(strategies) - set(STRATEGIES) or len(set(strategies)) != len(strategies):
            raise ConfigError(f"--strategy-choices must be strategies from {', '.join(STRATEGIES)} separated by "
                              f"commas, got {self.strategy_choices!r}")
        targets = [t for t in self.target_module_choices.replace(" ", "").split(",") if t]
        if not ranks or any(r < 1 or r != int(r) for r in ranks):
            raise ConfigError(f"--lora-r-choices must be positive integers, got {self.lora_r_choices!r}")
        if not alphas or any(a <= 0 for a in alphas):
            raise ConfigError(f"--lora-alpha-choices must be positive numbers, got {self.lora_alpha_choices!r}")
        for name, pair, low_ok in (("learning_rate_range", lr, lambda v: v > 0),
                                   ("full_learning_rate_range", full_lr, lambda v: v > 0),
                                   ("lora_dropout_range", dropout, lambda v: 0 <= v < 1)):
            if len(pair) != 2 or not low_ok(pair[0]) or not low_ok(pair[1]) or pair[0] > pair[1]:
                raise ConfigError(f"--{name.replace('_', '-')} must be low,high with low <= high in the valid "
                                  f"range, got {getattr(self, name)!r}")
        if not targets or set(targets) - set(TARGET_SETS):
            raise ConfigError(f"--target-module-choices must be from {', '.join(TARGET_SETS)}, "
                              f"got {self.target_module_choices!r}")
        return {"lora_r": [int(r) for r in ranks], "lora_alpha": alphas, "learning_rate": lr,
                "lora_dropout": dropout, "lora_target_modules": targets, "strategy": sorted(strategies),
                "full_learning_rate": full_lr}

    @property
    def multi_objective(self) -> bool:
        return self.objectives != "metric"


@dataclass
class CompareConfig:
    """Which tracked runs the results table and charts cover, and where they go."""

    experiment_name: str = _opt(DEFAULT_EXPERIMENT, "Experiment(s) to read, comma-separated (e.g. "
                                "imdb-sentiment,other-experiment); ignored with --run-ids.")
    run_ids: str = _opt("", "Compare exactly these runs (comma-separated ids), from any experiment.")
    filter_string: str = _opt("", "MLflow search filter the runs must also match, e.g. \"params.lora_r = '8'\".")
    output_dir: str = _opt("compare", "Folder for results.md, results.csv and the charts (also logged to MLflow).")
    registered_model_name: str = _opt(DEFAULT_REGISTERED_MODEL, "Registered model whose champion is marked in the "
                                      "table and charts, if it exists.")
    overwrite: bool = _opt(False, "Write into an --output-dir that holds other files: compare's own files are "
                           "replaced, the others left alone and never logged.", type=bool)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("--output-dir must name a folder")
        ids = self.ids()
        bad = [i for i in ids if not re.fullmatch(r"[0-9a-f]{32}", i)]
        if bad:
            raise ConfigError(f"--run-ids must be MLflow run ids (32 hex digits), got {bad[0]!r}")
        if not ids and not self.experiments():
            raise ConfigError("give --experiment-name or --run-ids")

    def ids(self) -> list[str]:
        return [i for i in self.run_ids.replace(" ", "").split(",") if i]

    def experiments(self) -> list[str]:
        return [e.strip() for e in self.experiment_name.split(",") if e.strip()]


@dataclass
class ServeConfig:
    """`python -m src.serve`: where it listens and what it takes."""

    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0 exposes it: see docs/security.md first).")
    port: int = _opt(5001, "Port to listen on.")
    workers: int = _opt(1, "Scoring processes (uvicorn workers), each holding the model.")
    max_body_mb: float = _opt(5.0, "Largest request body accepted, in MiB; a larger one is refused with HTTP 413 "
                              "before it is read. 1024 long reviews (the default max_batch_size) can need more.")

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be from 1 to 65535, got {self.port}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if not (self.max_body_mb > 0 and math.isfinite(self.max_body_mb)):
            raise ConfigError(f"--max-body-mb must be a positive number, got {self.max_body_mb}")


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
            return STRATEGIES[self.model.strategy].default_learning_rate
        return self.train.learning_rate

    def params(self) -> dict[str, Any]:
        """The settings that define the trained model (what MLflow logs as params)."""
        defining = {f.name for f in all_fields() if f.metadata["param"]}
        return {k: v for k, v in self.flat().items() if k in defining}

    def flat(self) -> dict[str, Any]:
        """Every resolved setting once, by its one name; LoRA settings only for LoRA runs."""
        out: dict[str, Any] = {}
        for attr in ("data", "model", "lora", "train", "tracking"):
            if attr == "lora" and not STRATEGIES[self.model.strategy].uses_lora:
                continue
            out.update(dataclasses.asdict(getattr(self, attr)))
        out["learning_rate"] = self.learning_rate
        return out

    def name_parts(self) -> list[str]:
        """What tells runs apart: the strategy's own parts (LoRA: rank and alpha), then the learning
        rate (1.5e-3, 5e-4: two digits, no rounding to 2e-3)."""
        mantissa, exponent = f"{self.learning_rate:.1e}".split("e")
        return STRATEGIES[self.model.strategy].name_parts(self.lora) + \
            [f"lr{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"]

    def default_run_name(self) -> str:
        return "-".join(self.name_parts())


def all_fields() -> list[dataclasses.Field]:
    return [f for group in GROUPS for f in dataclasses.fields(group)]


def may_change_on_resume() -> set[str]:
    return {f.name for f in all_fields() if f.metadata["may_change"]}


def parse_settings(text: str) -> dict[str, Any]:
    """'name=value,name=value' -> each value typed as its setting (the benchmarks' --variants)."""
    kinds = {f.name: f.metadata.get("type") or {"int": int, "float": float, "str": str}[f.type] for f in all_fields()}
    out: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = pair.partition("=")
        if name.strip() not in kinds:
            raise ConfigError(f"unknown setting {name.strip()!r} in {text!r}")
        kind = kinds[name.strip()]
        out[name.strip()] = value.strip().lower() in ("1", "true", "yes") if kind is bool else kind(value.strip())
    return out

