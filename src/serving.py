"""The registered model: text in, label and one probability per class out, loaded without unpickling.

A logged model is an MLflow "model from code" (`served_model.py`, no pickle) with three artifacts:

    artifacts/weights/           the transformers model (safetensors only) and its tokenizer files
    artifacts/classifier.json    label map, max_length, temperature, tokenizer hash, max batch size
    artifacts/train_texts.json   hashes of the texts the model trained on (the gate leaves them out)

`load(uri)` is the one way the project reads a logged or registered model (promotion gate, tuning
winner, `src.predict`): it downloads those files alone and builds the classifier from this code, so
nothing the store holds runs here. A version with a pickled python model or without safetensors
weights is refused with one line. `mlflow models serve` loads the same files through MLflow, which
executes the model's code file from the store (see the README's security section).

A custom pyfunc rather than the transformers flavour: that flavour's pipeline returns only the top
score per text, and with a PEFT model on a local base it silently reloads fresh weights (seen
with MLflow 3 and peft 0.21). The LoRA weights are merged first, so the artifact is one plain
model folder. Every MLflow call that reads a logged model's files is here (tracking.py logs them).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd  # loaded by mlflow.pyfunc already; here for predict's type hint

WEIGHTS = "weights"
CONFIG = "classifier.json"
TRAIN_TEXTS = "train_texts.json"
FORMAT = 2  # classifier.json's layout; version 1 (model_config in MLmodel, a pickled model) is read too


class InputError(ValueError):
    """A request the model cannot score: served as HTTP 400 with this one line."""


def requirements() -> list[str]:
    """Pins that a package index serves: a local label (torch 2.13.0+cpu) is dropped, so `mlflow models
    serve` and `build-docker` can install the model's environment."""
    from packaging.version import Version

    return [f"{pkg}=={Version(version(pkg)).public}" for pkg in ("mlflow", "torch", "transformers", "pandas", "numpy")]


def text_hash(text: str) -> str:
    """16 hex digits of sha256: enough to tell which examples a model trained on, without storing
    the texts themselves in the model."""
    import hashlib

    return hashlib.sha256(str(text).encode()).hexdigest()[:16]


def text_hashes(texts) -> set[str]:
    return {text_hash(t) for t in texts}


def check_texts(values: list[Any], max_batch_size: int) -> list[str]:
    """Texts only: a null, a number or a list would otherwise be scored as its string form."""
    if not values:
        raise InputError("the request holds no texts; send {\"inputs\": {\"text\": [\"a review\", ...]}}")
    if max_batch_size and len(values) > max_batch_size:
        raise InputError(f"{len(values)} texts in one request; this model takes at most {max_batch_size}: "
                         f"split the batch")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise InputError(f"text {i} is {type(value).__name__} ({str(value)[:40]!r}), not a string")
        if not value.strip():
            raise InputError(f"text {i} is empty")
    return list(values)


class TextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.load(context.artifacts[WEIGHTS], json.loads(Path(context.artifacts[CONFIG]).read_text()))

    def load(self, path: str, config: dict[str, Any]) -> None:
        """Load the model folder; the label map and tokenizer recorded at training are checked, so a
        model folder whose tokenizer or labels were swapped refuses to serve wrong answers."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from . import data
        from .loop import pick_device

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        recorded = config.get("tokenizer_hash", "")
        found = data.tokenizer_hash(self.tokenizer) if recorded else ""
        if found != recorded:
            raise ValueError(f"the tokenizer in {path} is not the one this model was trained with (hash "
                             f"{found}, recorded {recorded}); re-log the model")
        self.device = pick_device()
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True,
                                                                   trust_remote_code=False)
        self.model = model.to(self.device).eval()
        self.max_length = int(config.get("max_length", 512))
        self.temperature = float(config.get("temperature", 1.0))  # fitted on validation with temperature_scaling
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        labels = config.get("labels")
        if labels is not None and list(labels) != self.labels:
            raise ValueError(f"the model in {path} has labels {self.labels}, its training recorded {list(labels)}; "
                             f"re-log the model")

    def classify(self, texts: list[str], batch_size: int = 64, progress: str | None = None):
        import numpy as np
        import torch

        from .data import Encoded, tokenize
        from .evaluate import apply_temperature
        from .loop import predict

        frame = pd.DataFrame({"text": list(texts), "label": 0})
        enc: Encoded = tokenize(frame, self.tokenizer, self.max_length)
        ev = predict(self.model, enc, batch_size, self.tokenizer.pad_token_id or 0, self.device, torch.float32,
                     progress=progress)
        probs = ev.probs if self.temperature == 1.0 else apply_temperature(ev.probs, self.temperature)
        out = pd.DataFrame({"label": [self.labels[i] for i in probs.argmax(axis=1)]})
        for k, name in enumerate(self.labels):
            out[f"prob_{name}"] = probs[:, k].astype(np.float64)
        return out

    # A DataFrame hint is one MLflow infers no schema from (mlflow/types/type_hints.py): the logged
    # signature, input typed Any, stays in charge, and MLflow's "add type hints" warning goes away.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # noqa: ARG002
        import numpy as np
        from mlflow.exceptions import MlflowException

        if isinstance(model_input, pd.DataFrame):
            column = model_input["text"] if "text" in model_input.columns else model_input.iloc[:, 0]
            values = column.tolist() if len(model_input.columns) else []
        elif isinstance(model_input, dict):
            values = list(model_input.get("text", []))
        else:
            values = list(model_input)
        if len(values) == 1 and isinstance(values[0], list | tuple | np.ndarray):
            values = list(values[0])  # {"inputs": {"text": [...]}} arrives as one row holding the list
        values = [None if isinstance(v, float) and v != v else v for v in values]  # NaN: a missing text
        try:
            texts = check_texts(values, self.max_batch_size)
        except InputError as exc:
            # INVALID_PARAMETER_VALUE: MLflow's scoring server answers 400 with this message, no stack trace.
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return self.classify(texts)


# --- the one load path ---------------------------------------------------------------------------------

def load(model_uri: str) -> TextClassifier:
    """The classifier behind `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model` or a
    folder, built from its weights and JSON files only; raises ConfigError with one line."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        weights, config = fetch(model_uri, Path(tmp))
        classifier = TextClassifier()
        classifier.load(str(weights), config)
    return classifier


def fetch(model_uri: str, dst: Path, weights: bool = True) -> tuple[Path, dict[str, Any]]:
    """Download the weights folder (unless `weights` is False) and the JSON config of a logged model
    into `dst`, checked: a model without safetensors weights is refused before anything is loaded."""
    from .config import ConfigError

    dst.mkdir(parents=True, exist_ok=True)
    repo, mlmodel = _model_files(model_uri, dst)
    flavor = (mlmodel.get("flavors") or {}).get("python_function") or {}
    paths = {key: value.get("path") for key, value in (flavor.get("artifacts") or {}).items()
             if isinstance(value, dict)}
    weights_path = paths.get(WEIGHTS) or paths.get("model")  # "model": the layout of format 1
    if not weights_path:
        raise ConfigError(f"{model_uri} is not a text classifier logged by this project (no weights folder); "
                          f"register it again with this release")
    folder = dst / WEIGHTS
    if weights:
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(dir=dst) as tmp:  # the stored layout may differ (format 1: "model")
            shutil.move(repo.download_artifacts(weights_path, tmp), folder)
    if weights and not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{model_uri} has no safetensors weights (a pickled or foreign model); it is never "
                          f"loaded here: register it again with this release")
    if CONFIG in paths:
        config = json.loads(Path(repo.download_artifacts(paths[CONFIG], str(dst))).read_text())
    else:
        config = dict(flavor.get("model_config") or {})  # format 1 kept its settings in MLmodel
    return folder, config


def train_text_hashes(model_uri: str) -> set[str] | None:
    """Hashes of the texts a logged model trained on; None for a model logged without them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        repo, mlmodel = _model_files(model_uri, Path(tmp))
        artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
        path = (artifacts.get(TRAIN_TEXTS) or {}).get("path")
        if not path:
            return None
        return set(json.loads(Path(repo.download_artifacts(path, tmp)).read_text()))


def _model_files(model_uri: str, dst: Path):
    """The artifact repository of a logged model and its MLmodel file, read as plain YAML."""
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from .config import ConfigError

    if "://" not in model_uri and ":/" not in model_uri and not (Path(model_uri) / "MLmodel").is_file():
        raise ConfigError(f"cannot load model {model_uri!r}: no MLmodel file there; give a logged model's folder "
                          f"or a models:/ or runs:/ URI")
    try:
        repo = get_artifact_repository(model_uri)  # models:/ and runs:/ resolve to the logged model
        mlmodel = yaml.safe_load(Path(repo.download_artifacts("MLmodel", str(dst))).read_text()) or {}
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"cannot load model {model_uri!r}: {str(exc).splitlines()[0]}") from None
    return repo, mlmodel
