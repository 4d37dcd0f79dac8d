"""Fine-tune a text classifier, fully or with LoRA, tracked in MLflow.

    python -m src.train --strategy lora --help
    mlflow run . -e lora -P lora_r=16 -P learning_rate=5e-4

Only the command lives here so `--help` answers at once; the loop is in `loop.py`, the whole
run (data -> model -> loop -> evaluation -> MLflow) in `experiment.py`.
"""

from .cli import train_main

if __name__ == "__main__":
    train_main()
