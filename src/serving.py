"""The registered model as an MLflow pyfunc: text in, label and one probability per class out.

A custom pyfunc rather than the transformers flavour: that flavour's pipeline returns only the top
score per text, and with a PEFT model on a local base it silently reloads fresh weights
(STACK_NOTES). Here the LoRA weights are merged first, so the artifact is one plain model folder.
"""

from __future__ import annotations

from importlib.metadata import version

import mlflow.pyfunc


def requirements() -> list[str]:
    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "transformers", "pandas", "numpy")]


class TextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.load(context.artifacts["model"], int(config.get("max_length", 512)), float(config.get("temperature", 1.0)),
                  config.get("labels"), config.get("tokenizer_hash", ""))

    def load(self, path: str, max_length: int, temperature: float = 1.0, labels: list[str] | None = None,
             tokenizer_hash: str = "") -> None:
        """Load the model folder; the label map and tokenizer recorded at training are checked, so a
        model folder whose tokenizer or labels were swapped refuses to serve wrong answers."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from . import data
        from .loop import pick_device

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        found = data.tokenizer_hash(self.tokenizer) if tokenizer_hash else ""
        if found != tokenizer_hash:
            raise ValueError(f"the tokenizer in {path} is not the one this model was trained with (hash "
                             f"{found}, recorded {tokenizer_hash}); re-log the model")
        self.device = pick_device()
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        self.model = model.to(self.device).eval()
        self.max_length = max_length
        self.temperature = temperature  # fitted on validation when the run used temperature_scaling
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        if labels is not None and list(labels) != self.labels:
            raise ValueError(f"the model in {path} has labels {self.labels}, its training recorded {list(labels)}; "
                             f"re-log the model")

    def classify(self, texts: list[str], batch_size: int = 64, progress: str | None = None):
        import numpy as np
        import pandas as pd
        import torch

        from .data import Encoded, tokenize
        from .evaluate import apply_temperature
        from .loop import predict

        frame = pd.DataFrame({"text": [str(t) for t in texts], "label": 0})
        enc: Encoded = tokenize(frame, self.tokenizer, self.max_length)
        ev = predict(self.model, enc, batch_size, self.tokenizer.pad_token_id or 0, self.device, torch.float32,
                     progress=progress)
        probs = ev.probs if self.temperature == 1.0 else apply_temperature(ev.probs, self.temperature)
        out = pd.DataFrame({"label": [self.labels[i] for i in probs.argmax(axis=1)]})
        for k, name in enumerate(self.labels):
            out[f"prob_{name}"] = probs[:, k].astype(np.float64)
        return out

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text"] if "text" in model_input.columns else model_input.iloc[:, 0]
        else:
            texts = model_input
        return self.classify(list(texts))
