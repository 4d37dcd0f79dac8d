"""What each strategy's logged model costs in the artifact store, at DistilBERT's size.

    python benchmarks/model_size.py --vocab ../shared/data/tokenizer/vocab.txt

Builds the distilbert-base-uncased architecture with random weights (sizes do not depend on training)
and its real uncased vocabulary as a local base model, wraps it by each strategy (full, LoRA r=8 on
q/k/v, head only) and logs it exactly as a training run does (`tracking.log_model`, with 22,500
training-text hashes as a full IMDB run has) into a throw-away local MLflow store; prints the bytes
of each logged model's files, of the code it ships, and the hardware.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def base_model(vocab_file: Path, folder: Path) -> Path:
    """DistilBERT-base with random weights and the real vocabulary, saved like a pretrained checkpoint."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    words = vocab_file.read_text(encoding="utf-8").splitlines()
    tokenizer = DistilBertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")] \
        if info.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, required=True, help="distilbert's vocab.txt")
    args = parser.parse_args()
    import mlflow
    import transformers

    from src.base.config import LoraConfig
    from src.core.modeling import build_model, count_params
    from src.mlflow_io import serving, tracking

    transformers.logging.set_verbosity_error()  # the fresh head's "newly initialized" notice, once per model
    print(f"command: python benchmarks/model_size.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {cpu_model()}, Python {platform.python_version()}, transformers {transformers.__version__}")
    hashes = {f"{i:016x}" for i in range(22_500)}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(args.vocab, Path(tmp) / "base")
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("model-size")
        print("| strategy | trainable params | logged model bytes | of which weights | code shipped |")
        print("|---|---|---|---|---|")
        for strategy in ("full", "lora", "head"):
            model = build_model(str(base), strategy, ["neg", "pos"], LoraConfig(lora_r=8, lora_alpha=32))
            tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(base)
            with mlflow.start_run(run_name=strategy):
                info = tracking.log_model(model, tokenizer, {"strategy": strategy, "max_length": 512,
                                                            "temperature": 1.0, "max_batch_size": 1024},
                                          hashes, base=str(base))
            root = Path(mlflow.artifacts.download_artifacts(f"models:/{info.model_id}", dst_path=f"{tmp}/{strategy}"))
            weights = sum(p.stat().st_size for p in (root / "artifacts" / "weights").glob("*.safetensors"))
            code = sum((root / "code" / "src" / c).stat().st_size for c in serving.CODE)
            print(f"| {strategy} | {count_params(model).trainable:,} | {folder_bytes(root):,} | {weights:,} | "
                  f"{code:,} |")


if __name__ == "__main__":
    main()
