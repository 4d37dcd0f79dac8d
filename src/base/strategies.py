"""What a run trains, one object per strategy: full fine-tuning, LoRA, the linear probe (head only).

A strategy says its name, its default learning rate, how it wraps a loaded classifier (what trains),
what a run saves of the trained model and how a model is rebuilt from that, the parts of a run's
name, and what a tuning trial samples. Every module reads `STRATEGIES`; none keeps a list of its own.
A new strategy is a class here and an `-e <name>` entry in MLproject.

Standard library at import: the settings read names and learning rates before anything heavy loads,
and a logged model ships this file to rebuild itself; torch, transformers and peft are imported by
the methods that use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError

# Freshly initialised head modules that train in full (and, for LoRA, are saved with the adapter).
# DistilBERT's head is two layers; training both is what gives the course report's 0.81M trainable parameters.
HEAD_MODULES = {
    "distilbert": ["pre_classifier", "classifier"],
    "deberta-v2": ["pooler", "classifier"],
    "deberta": ["pooler", "classifier"],
    "modernbert": ["head", "classifier"],
}
DEFAULT_HEAD = ["classifier", "score"]

# Attention projections LoRA adapts by default, per `config.model_type`.
LORA_TARGETS = {
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "xlm-roberta": ["query", "key", "value"],
    "camembert": ["query", "key", "value"],
    "electra": ["query", "key", "value"],
    "albert": ["query", "key", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpnet": ["q", "k", "v"],
    "modernbert": ["Wqkv"],
}
# The attention output projection, added by `lora_target_modules=attention-output`.
ATTENTION_OUTPUT = {"distilbert": ["out_lin"], "mpnet": ["o"], "modernbert": ["Wo"]}
DEFAULT_ATTENTION_OUTPUT = ["attention.output.dense"]  # BERT family, DeBERTa


def head_modules(model) -> list[str]:
    """The classification head's module names that this model has."""
    wanted = HEAD_MODULES.get(model.config.model_type, DEFAULT_HEAD)
    return [m for m in wanted if any(n == m or n.endswith("." + m) for n, _ in model.named_modules())]


def skeleton(config):
    """The classifier a config describes, on the meta device: its modules and sizes, no weights read."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def log_float(trial, name: str, pair: list[float]) -> float:
    low, high = pair
    return trial.suggest_float(name, low, high, log=True) if low < high else low


def _config_and_model(folder: Path, base: Path):
    """The base classifier with the run's config (label map, attention dropout) from `folder`. Its
    classification head is missing from the base by design (the strategy's files restore it), so
    transformers' load report, which calls it newly initialized, is not shown."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(base, config=config, use_safetensors=True,
                                                                  trust_remote_code=False, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)


def _quiet_peft() -> None:
    """peft asks transformers for its deprecated `is_gradient_checkpointing` on every PeftModel
    (peft_model.py); nothing the project does can avoid it, so it is not shown."""
    import warnings

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class Strategy:
    name = ""
    title = ""  # what a run's description calls it
    default_learning_rate = 0.0
    uses_lora = False  # the LoRA settings apply (params, run name, search)
    needs_base = False  # a saved model names its base model instead of holding all of its weights
    marker, color = "o", "grey"  # in compare's charts

    def wrap(self, model, lora):  # noqa: ARG002 - the interface: LoRA reads its settings
        """The loaded classifier, ready to train: what requires grad is what this strategy trains."""
        return model

    def check(self, config, lora) -> None:
        """Refuse, from the architecture alone, settings this strategy cannot apply to the model."""

    def label(self, model, lora) -> str:  # noqa: ARG002 - the interface
        return self.title

    def name_parts(self, lora) -> list[str]:  # noqa: ARG002 - the interface
        return [self.name]

    def sample(self, trial, space: dict[str, list]) -> dict[str, Any]:
        """The settings a tuning trial of this strategy draws (Optuna trial, the search's ranges)."""
        return {"learning_rate": log_float(trial, f"{self.name}_learning_rate", space["learning_rate"])}

    def save(self, model, folder: Path) -> None:
        """What a logged model holds of the trained weights (safetensors), with a config.json that
        carries the label map."""
        model.save_pretrained(folder, safe_serialization=True)

    def restore(self, folder: Path, base: Path | None):  # noqa: ARG002 - the interface
        """The plain transformers classifier from what `save` wrote (and the base, if it needs one)."""
        import torch
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                                  trust_remote_code=False, dtype=torch.float32)


class Full(Strategy):
    name, title, default_learning_rate = "full", "Full fine-tuning", 5e-5
    marker, color = "s", "#4c72b0"

    def sample(self, trial, space: dict[str, list]) -> dict[str, Any]:
        return {"learning_rate": log_float(trial, "full_learning_rate", space["full_learning_rate"])}


class Lora(Strategy):
    # LoRA wants roughly 10x the full fine-tuning rate: on the real IMDB with a pretrained MiniLM, LoRA
    # r8 q/k/v reached 0.9145 test accuracy at 5e-4 but 0.8534 at the course report's 2e-5 (benchmarks/README.md).
    name, title, default_learning_rate = "lora", "LoRA", 5e-4
    uses_lora, needs_base = True, True
    marker, color = "o", "#dd8452"

    def targets(self, model_type: str, lora) -> list[str] | str:
        """'auto' and 'attention-output' resolved per architecture; 'all-linear' and names as given."""
        value = lora.lora_target_modules.replace(" ", "")
        if value == "all-linear":
            return value
        if value not in ("auto", "attention-output"):
            return value.split(",")
        if model_type not in LORA_TARGETS:
            raise ConfigError(f"no default LoRA targets for model type {model_type!r}; "
                              f"pass --lora-target-modules (names or all-linear)")
        extra = ATTENTION_OUTPUT.get(model_type, DEFAULT_ATTENTION_OUTPUT) if value == "attention-output" else []
        return LORA_TARGETS[model_type] + extra

    def check(self, config, lora) -> None:
        targets = self.targets(config.model_type, lora)
        if isinstance(targets, list):
            names = [n for n, _ in skeleton(config).named_modules()]
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                raise ConfigError(f"LoRA targets {missing} do not match modules of {config.model_type!r}; "
                                  f"pass --lora-target-modules with names from the model or all-linear")

    def wrap(self, model, lora):
        import peft

        _quiet_peft()
        targets = self.targets(model.config.model_type, lora)
        config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=lora.lora_r, lora_alpha=lora.lora_alpha,
                                 lora_dropout=lora.lora_dropout, target_modules=targets,
                                 modules_to_save=head_modules(model))
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:
            raise ConfigError(f"LoRA targets {targets} do not match modules of {model.config.model_type!r} "
                              f"({str(exc).splitlines()[0]})") from exc

    def label(self, model, lora) -> str:
        """'LoRA r8 q_lin/k_lin/v_lin': the modules peft adapted."""
        targets = getattr(model, "peft_config", {}).get("default")
        modules = sorted(targets.target_modules) if targets is not None and targets.target_modules else []
        return f"LoRA r{lora.lora_r} {'/'.join(modules) if modules else lora.lora_target_modules}"

    def name_parts(self, lora) -> list[str]:
        return ["lora", f"r{lora.lora_r}", f"a{lora.lora_alpha:g}"]

    def sample(self, trial, space: dict[str, list]) -> dict[str, Any]:
        drop_low, drop_high = space["lora_dropout"]
        return {
            "lora_r": trial.suggest_categorical("lora_r", space["lora_r"]),
            "lora_alpha": trial.suggest_categorical("lora_alpha", space["lora_alpha"]),
            "learning_rate": log_float(trial, "learning_rate", space["learning_rate"]),
            "lora_dropout": trial.suggest_float("lora_dropout", drop_low, drop_high) if drop_low < drop_high
            else drop_low,
            "lora_target_modules": trial.suggest_categorical("lora_target_modules", space["lora_target_modules"]),
        }

    def save(self, model, folder: Path) -> None:
        """The adapter with the trained head (peft's own files, a few MB), and the base's config.json
        beside it with the label map; peft's model card template is left out."""
        model.save_pretrained(folder, safe_serialization=True)
        model.get_base_model().config.save_pretrained(folder)
        (folder / "README.md").unlink(missing_ok=True)

    def restore(self, folder: Path, base: Path | None):
        import peft

        _quiet_peft()
        return peft.PeftModel.from_pretrained(_config_and_model(folder, base), folder).merge_and_unload()


class Head(Strategy):
    """The linear probe: the encoder frozen, only the classification head trains. The baseline every
    LoRA comparison is read against: what the pretrained features give without adapting them."""

    name, title, default_learning_rate = "head", "Classification head only", 1e-3
    needs_base = True
    marker, color = "^", "#55a868"

    def wrap(self, model, lora):  # noqa: ARG002 - the interface
        trained = tuple(head_modules(model))
        for name, param in model.named_parameters():
            param.requires_grad = any(part in trained for part in name.split("."))
        return model

    def save(self, model, folder: Path) -> None:
        """The head's tensors alone (safetensors) and config.json with the label map."""
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(folder / "head.safetensors"))
        model.config.save_pretrained(folder)

    def restore(self, folder: Path, base: Path | None):
        from safetensors.torch import load_file

        model = _config_and_model(folder, base)
        head = load_file(str(folder / "head.safetensors"))
        missing = set(head) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ConfigError(f"{folder} holds head tensors its base model has no place for: {sorted(missing)[:3]}")
        model.load_state_dict(head, strict=False)
        return model


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Full(), Lora(), Head())}
DEFAULT_LEARNING_RATE = {name: s.default_learning_rate for name, s in STRATEGIES.items()}


def get(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]
