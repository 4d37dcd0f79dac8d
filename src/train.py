"""Fine-tune a text classifier, fully or with LoRA, tracked in MLflow.

    python -m src.train --strategy lora --help
    mlflow run . -e lora -P lora_r=16 -P learning_rate=5e-4

Only the command lives here so `--help` answers at once; the loop is in `loop.py`, the whole
run (data -> model -> loop -> evaluation -> MLflow) in `finetune.py`. An entry point: it imports
the orchestration, which imports nothing back from here.
"""

from __future__ import annotations

from typing import Any

import click

from .base.config import ConfigError
from .cli import build_config, config_options, fail, main, quiet_libraries


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options
def train(**values: Any) -> None:
    """Fine-tune a sequence classifier (full or LoRA) and track everything in MLflow."""
    cfg = build_config(values)
    from .flows.finetune import finetune

    quiet_libraries()
    try:
        out = finetune(cfg)
    except ConfigError as exc:
        fail(exc)
        return
    from .core.loop import close_distributed

    close_distributed()
    if not out.run_id:
        return  # a non-zero rank of a data-parallel job: rank 0 reports
    click.echo(
        f"run {out.run_id}: best epoch {out.best_epoch}, val accuracy {out.val['accuracy']:.4f} "
        f"f1 {out.val['f1']:.4f}; test accuracy {out.test['accuracy']:.4f} f1 {out.test['f1']:.4f}; "
        f"trainable params {out.trainable_params:,} of {out.total_params:,}"
    )
    from .mlflow_io.tracking import ui_link

    click.echo(f"view in MLflow: {ui_link(out.experiment_id)}", err=True)


if __name__ == "__main__":
    main(train, "python -m src.train")
