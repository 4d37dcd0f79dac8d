"""The logged classifier: text in, label and one probability per class out, and the one way it is loaded.

Every training run logs its model as an MLflow "model from code" (`served_model.py`, no pickle):

    artifacts/weights/           full fine-tuning: config.json + model.safetensors; LoRA: the adapter
                                 (adapter_config.json + adapter_model.safetensors, head included) and
                                 config.json with the label map; the tokenizer files either way
    artifacts/classifier.json    format, labels, max_length, temperature, max batch size, and for LoRA
                                 the base model (as --model names it) with the sha256 of its weights
    artifacts/train_texts.json   hashes of the texts the model trained on (the gate leaves them out)

The sha256 of each of those files is a tag of the logged model (`model.files`), in the tracking store,
where the artifact store's writers cannot change it. `load(uri)` (the gate, `src.predict`,
`src.serve`, a search's winner) downloads exactly the listed files, checks every digest (and the
LoRA base's) and refuses code (`.py` files, `auto_map`) before anything is read by transformers, so
what is loaded is what was judged and nothing the store holds runs here. A LoRA model finds its base
the way `--model` does (a local folder, or the Hugging Face cache and hub): offline once cached.
`mlflow models serve` executes the model's code file from the store instead (docs/security.md).

This module, `core/inference.py`, `base/integrity.py`, `base/strategies.py` and `base/errors.py` are
the code a logged model ships (`CODE`): they import nothing else of the project.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd  # loaded by mlflow.pyfunc already; here for predict's type hint

from ..base import strategies
from ..base.errors import ConfigError

# Re-exported: callers name a logged model's files and digests through this one module.
from ..base.integrity import file_digest, manifest, manifest_digest, refuse_code, weights_digest  # noqa: F401
from ..core import inference
from ..core.inference import pick_device

WEIGHTS = "weights"
CONFIG = "classifier.json"
TRAIN_TEXTS = "train_texts.json"
FILES = (WEIGHTS, CONFIG, TRAIN_TEXTS)  # what `artifacts/` holds
FORMAT = 3  # 3: LoRA as adapter + base, digests in the store; 2 (always merged weights) loads once sealed
MANIFEST_TAG = "model.files"  # on the logged model: {"artifacts/...": sha256}
# The modules a logged model ships: scoring and loading, and each strategy's way to rebuild its model.
CODE = ("__init__.py", "base/__init__.py", "base/errors.py", "base/integrity.py", "base/strategies.py",
        "core/__init__.py", "core/inference.py", "mlflow_io/__init__.py", "mlflow_io/serving.py")  # under src/


class InputError(ValueError):
    """A request the model cannot score: served as HTTP 400 with this one line."""


def requirements() -> list[str]:
    """Pins that a package index serves: a local label (torch 2.13.0+cpu) is dropped, so `mlflow models
    serve` and `build-docker` can install the model's environment."""
    from packaging.version import Version

    return [f"{pkg}=={Version(version(pkg)).public}"
            for pkg in ("mlflow", "torch", "transformers", "peft", "pandas", "numpy")]


def text_hash(text: str) -> str:
    """16 hex digits of sha256: enough to tell which examples a model trained on, without storing
    the texts themselves in the model."""
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


def base_folder(name: str) -> Path:
    """The base model's folder, found the way `--model` finds it: a local folder, else the Hugging
    Face cache (no network needed once cached), else the hub."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fetch it
        try:
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - offline, unknown name: one line
            raise ConfigError(f"the base model {name!r} of this LoRA model is neither a local folder nor in the "
                              f"Hugging Face cache, and the hub did not answer ({str(exc).splitlines()[0][:120]}); "
                              f"download it once online") from None


def build(folder: Path, config: dict[str, Any]):
    """The plain transformers model of a model folder, rebuilt by the strategy that saved it: its full
    weights, or its base (checked against the digest recorded at logging) with the trained part."""

    refuse_code(folder, "the model folder")
    # Models of format 2 name no strategy: their weights are whole (LoRA was merged before logging).
    strategy = strategies.get(config.get("strategy", "full") if config.get("format", 2) >= 3 else "full")
    if not strategy.needs_base:
        return strategy.restore(folder, None)
    base = config.get("base") or {}
    if not base.get("model") or not base.get("sha256"):
        raise ConfigError(f"{folder} holds a {strategy.title} model but its classifier.json names no base model; "
                          f"re-log it")
    where = base_folder(str(base["model"]))
    refuse_code(where, f"the base model {base['model']!r}")
    if weights_digest(where) != base["sha256"]:
        raise ConfigError(f"the base model {base['model']!r} ({where}) is not the one this model was trained on "
                          f"(its weights' sha256 differs from the recorded one)")
    return strategy.restore(folder, where)


class TextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.load(context.artifacts[WEIGHTS], json.loads(Path(context.artifacts[CONFIG]).read_text()))

    def load(self, path: str, config: dict[str, Any]) -> None:
        """Load a model folder; the label map recorded at training is checked against the model's."""
        from transformers import AutoTokenizer

        folder = Path(path)
        self.model = build(folder, config).to(pick_device()).eval()
        self.device = next(self.model.parameters()).device
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.max_length = int(config.get("max_length", 512))
        self.temperature = float(config.get("temperature", 1.0))  # fitted on validation with temperature_scaling
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        labels = config.get("labels")
        if labels is not None and list(labels) != self.labels:
            raise ConfigError(f"the model in {path} has labels {self.labels}, its training recorded {list(labels)}; "
                              f"re-log the model")

    def probabilities(self, texts: list[str], batch_size: int = 64, on_batch=None):
        """Calibrated probabilities, one row per text, in input order."""
        import numpy as np

        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        scores = inference.logits(self.model, [np.asarray(x) for x in encoded], batch_size,
                                  self.tokenizer.pad_token_id or 0, self.device, on_batch=on_batch)
        return inference.probabilities(scores, self.temperature)

    def classify(self, texts: list[str], batch_size: int = 64, progress: str | None = None) -> pd.DataFrame:
        import numpy as np
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), desc=progress, disable=progress is None, mininterval=2.0) as bar:
            probs = self.probabilities(texts, batch_size, bar.update)
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
    """The classifier behind `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/m-ID`,
    `runs:/ID/model` or a local model folder; raises ConfigError with one line."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        weights, config = fetch(model_uri, Path(tmp))
        classifier = TextClassifier()
        classifier.load(str(weights), config)
    return classifier


def fetch(model_uri: str, dst: Path, weights: bool = True) -> tuple[Path, dict[str, Any]]:
    """The weights folder (unless `weights` is False) and the config of a model, in `dst`: a stored
    model's listed files each checked against its digest, a local folder as it is. No code is let in."""
    local = Path(model_uri)
    if "://" not in model_uri and ":/" not in model_uri:
        if not (local / "artifacts" / CONFIG).is_file():
            raise ConfigError(f"cannot load model {model_uri!r}: no artifacts/{CONFIG} there; give a logged "
                              f"model's folder or a models:/ or runs:/ URI")
        refuse_code(local / "artifacts", f"model folder {model_uri}")
        return local / "artifacts" / WEIGHTS, json.loads((local / "artifacts" / CONFIG).read_text())
    stored = resolve(model_uri)
    wanted = {p: d for p, d in stored.files.items() if weights or p == f"artifacts/{CONFIG}"}
    download(stored, wanted, dst, model_uri)
    config = json.loads((dst / "artifacts" / CONFIG).read_text())
    return dst / "artifacts" / WEIGHTS, config


class Stored:
    """A logged model in the store: where its files are and their recorded digests."""

    def __init__(self, model_id: str, artifact_location: str, files: dict[str, str], run_id: str) -> None:
        self.model_id, self.artifact_location, self.files, self.run_id = model_id, artifact_location, files, run_id


def resolve(model_uri: str) -> Stored:
    """The logged model behind a URI and its manifest (the `model.files` tag); refused when the
    manifest is missing, lists code, or disagrees with the digest its registered version recorded."""
    import re

    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        model_id, recorded = _model_id(client, model_uri)
        logged = client.get_logged_model(model_id)
    except MlflowException as exc:
        raise ConfigError(f"cannot load model {model_uri!r}: {str(exc).splitlines()[0]}") from None
    text = logged.tags.get(MANIFEST_TAG)
    if not text:
        raise ConfigError(f"{model_uri} is not a text classifier logged by this project (no recorded file digests); "
                          f"a model of an earlier release is sealed with `python -m src.registry seal`")
    files = json.loads(text)
    bad = [p for p in files if not re.fullmatch(r"artifacts/[\w.\-/]+", p) or ".." in p
           or Path(p).suffix in (".py", ".pyc", ".so")]
    if bad or f"artifacts/{CONFIG}" not in files:
        raise ConfigError(f"{model_uri} lists files a classifier of this project never holds ({', '.join(bad[:3])}); "
                          f"it is not loaded")
    if recorded and recorded != manifest_digest(files):
        raise ConfigError(f"{model_uri}: the file digests of logged model {model_id} differ from those its "
                          f"registration recorded; it is not loaded")
    return Stored(model_id, logged.artifact_location, files, logged.source_run_id or "")


def _model_id(client, model_uri: str) -> tuple[str, str]:
    """(logged model id, the manifest digest a registered version recorded, or '')."""
    import re

    if m := re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri):
        return m.group(1), ""
    if m := re.fullmatch(r"runs:/([0-9a-f]{32})/([\w.\-]+)", model_uri):
        experiment = client.get_run(m.group(1)).info.experiment_id
        found = client.search_logged_models(
            [experiment], filter_string=f"source_run_id = '{m.group(1)}' AND name = '{m.group(2)}'", max_results=1)
        if not found:
            raise ConfigError(f"run {m.group(1)} logged no model named {m.group(2)!r}")
        return found[0].model_id, ""
    if m := re.fullmatch(r"models:/([^/@]+)(?:@([\w\-]+)|/(\d+))", model_uri):
        name, alias, number = m.groups()
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        found = re.fullmatch(r"models:/(m-[0-9a-f]+)", mv.source or "")
        model_id = getattr(mv, "model_id", None) or (found.group(1) if found else None)
        if not model_id:
            raise ConfigError(f"{model_uri} was registered from {mv.source!r}, not from a logged model; it is not a "
                              f"text classifier logged by this project")
        return model_id, mv.tags.get("files.sha256", "")
    raise ConfigError(f"cannot load model {model_uri!r}: give models:/NAME@ALIAS, models:/NAME/VERSION, "
                      f"models:/m-ID, runs:/RUN_ID/model or a local model folder")


def download(stored: Stored, files: dict[str, str], dst: Path, model_uri: str) -> None:
    """Each listed file into `dst`, checked against its digest: a mismatch names the file."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(stored.artifact_location)
    dst.mkdir(parents=True, exist_ok=True)
    for path, expected in files.items():
        try:  # the logged model's location is its folder: `path` lands at dst/path
            target = Path(repo.download_artifacts(path, str(dst)))
        except Exception as exc:  # noqa: BLE001 - missing in the store, a refused request: one line
            raise ConfigError(f"{model_uri}: file {path} cannot be read from the artifact store "
                              f"({str(exc).splitlines()[0][:160]})") from None
        if file_digest(target) != expected:
            raise ConfigError(f"{model_uri}: file {path} is not the one recorded when the model was logged (sha256 "
                              f"differs); the artifact store was changed after logging: it is not loaded")


def train_text_hashes(model_uri: str) -> set[str] | None:
    """Hashes of the texts a stored model trained on (checked like its other files); None if it has none."""
    import tempfile

    path = f"artifacts/{TRAIN_TEXTS}"
    if "://" not in model_uri and ":/" not in model_uri:  # a local model folder, taken as it is
        local = Path(model_uri) / path
        return set(json.loads(local.read_text())) if local.is_file() else None
    stored = resolve(model_uri)
    if path not in stored.files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        download(stored, {path: stored.files[path]}, Path(tmp), model_uri)
        return set(json.loads((Path(tmp) / path).read_text()))
