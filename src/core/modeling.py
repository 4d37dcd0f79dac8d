"""The base encoder, loaded and checked, and wrapped by the run's strategy (strategies.py) for training."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..base import hub, strategies
from ..base.config import ConfigError, LoraConfig
from ..base.integrity import refuse_code

# What architectures call the dropout on attention probabilities in their config.
ATTENTION_DROPOUT_NAMES = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")


@dataclass
class ParamCount:
    trainable: int
    total: int

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / self.total


def count_params(model) -> ParamCount:
    """Counted from the live model. peft keeps a frozen original of each head module beside its
    trained copy (`original_module`); that bookkeeping copy is not part of the model a user gets."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParamCount(trainable, total)


def load_config(name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"could not load the model config of {name!r} ({str(exc).splitlines()[0]})") from exc


def check_weights(name: str) -> None:
    """A local model folder must hold safetensors weights: models load from safetensors only (a
    pickled pytorch_model.bin can run code when read), and finding that out when the weights load
    would leave a FAILED run behind. Hub names are checked by the load itself."""
    from pathlib import Path

    folder = Path(name)
    if folder.is_dir():
        refuse_code(folder, f"model folder {name!r}")
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
    raise ConfigError(f"model folder {name!r} has no safetensors weights{found}; save the model with "
                      f"save_pretrained(), which writes model.safetensors, from a copy you trust")


def length_limit(config, tokenizer) -> int:
    """The longest input the model takes: the tokenizer's limit where it states one (RoBERTa's
    514 positions hold 512 tokens), else the position table."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000:  # transformers uses a huge sentinel for "not set"
        return int(limit)
    return int(getattr(config, "max_position_embeddings", 512))


def planned_params(config, strategy: str, lora: LoraConfig, num_labels: int) -> ParamCount:
    """Trainable and total parameters of the model a run will build, from the architecture alone
    (meta device), so checkpoint sizes are known before any weight loads."""
    import warnings

    config = copy.deepcopy(config)
    config.num_labels = num_labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft probes a deprecated transformers property
        return count_params(strategies.get(strategy).wrap(strategies.skeleton(config), lora))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        from pathlib import Path

        hint = "" if Path(name).is_dir() else f"; {hub.hint(name)}"
        raise ConfigError(f"could not load a tokenizer from {name!r} ({str(exc).splitlines()[0][:200]}){hint}") from exc


def attention_dropout_override(config, attention_dropout: float | None) -> dict:
    """The config override that sets attention dropout. Dropout on the attention probabilities
    keeps PyTorch's scaled-dot-product attention off its fused kernels during training (on CPU
    the flash kernel takes no dropout): the math fallback materialises every batch x head x L x L
    probability and draws a random mask for each, the larger half of a DistilBERT step at 512
    tokens."""
    if attention_dropout is None:
        return {}
    found = next((n for n in ATTENTION_DROPOUT_NAMES if hasattr(config, n)), None)
    if found is None:
        if attention_dropout:
            raise ConfigError(f"model type {config.model_type!r} has no attention-dropout setting (looked for "
                              f"{', '.join(ATTENTION_DROPOUT_NAMES)}); pass --attention-dropout 0")
        return {}
    return {found: attention_dropout}


def build_model(name: str, strategy: str, labels: list[str], lora: LoraConfig,
                attention_dropout: float | None = None):
    """The classifier to train, wrapped by its strategy (for LoRA a PeftModel whose head trains and
    saves with it). `attention_dropout` None keeps the checkpoint's value."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = load_config(name)  # read once, adjusted, then handed to the model
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {n: i for i, n in enumerate(labels)}
    config.update(attention_dropout_override(config, attention_dropout))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name,
            config=config,
            # transformers 5 loads a checkpoint in its stored dtype; a bf16/fp16 checkpoint would then
            # train in pure half precision, where small updates vanish. fp32 master weights, and
            # autocast for bf16/fp16 compute, are the mixed-precision recipe.
            dtype=torch.float32,
            trust_remote_code=False,
            # safetensors only: a pickled .bin checkpoint can run code when loaded.
            use_safetensors=True,
        )
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"could not load model {name!r} ({str(exc).splitlines()[0]})") from exc
    return strategies.get(strategy).wrap(model, lora)

