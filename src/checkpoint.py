"""Checkpoints that resume a run exactly: weights, optimizer, schedule, RNG and data order.

One file per run, `<checkpoint_dir>/<run_id>/last.pt`, replaced atomically (write, then rename), so a
kill at any moment leaves the previous complete checkpoint. Removed when the run finishes: the
trained model is then in MLflow.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from .config import ConfigError

FILE = "last.pt"
# Settings that may differ between the interrupted run and its resumption.
MAY_CHANGE = {"resume_run_id", "checkpoint_steps", "eval_batch_size", "logging_steps", "temperature_scaling",
              "registered_model_name", "promotion_alpha", "max_batch_size"}


class Checkpointer:
    def __init__(self, folder: str | Path, run_id: str, config: dict[str, Any]):
        self.folder = Path(folder) / run_id
        self.run_id = run_id
        self.config = config

    @property
    def path(self) -> Path:
        return self.folder / FILE

    def save(self, state: dict[str, Any]) -> None:
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "run_id": self.run_id, "config": self.config}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # only if no other run keeps a checkpoint there
        except OSError:
            pass


# Bytes per trainable parameter in a checkpoint: fp32 weights, the best epoch's copy, and AdamW's two moments.
BYTES_PER_TRAINABLE = 16
MARGIN = 64 * 2**20


def existing_ancestor(path: str | Path) -> Path:
    """The path itself if it exists, else its nearest existing parent: where a folder still to be
    created would get its permissions and its disk."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def check_space(folder: str | Path, trainable: int) -> int:
    """Fail now, not at the end of the first epoch, when the disk cannot take a checkpoint; room
    for two because the new file is written beside the old one before it replaces it."""
    need = 2 * BYTES_PER_TRAINABLE * trainable + MARGIN
    existing = existing_ancestor(folder)
    if not existing.is_dir():
        raise ConfigError(f"--checkpoint-dir {folder!r} is not a folder ({existing} is a file); pick a folder "
                          f"or pass --checkpoint-dir '' to run without checkpoints")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--checkpoint-dir {folder!r} is not writable (at {existing}); pick another folder "
                          f"or pass --checkpoint-dir '' to run without checkpoints")
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(f"--checkpoint-dir {folder!r} has {free / 2**30:.2f} GiB free, checkpoints of this model "
                          f"need {need / 2**30:.2f} GiB; free space, pick another folder or pass --checkpoint-dir ''")
    return need


def load(folder: str | Path, run_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of `run_id`, checked against the settings of the resuming command."""
    import torch

    path = Path(folder) / run_id / FILE
    if not path.is_file():
        raise ConfigError(f"no checkpoint for run {run_id} at {path}; check --resume-run-id and --checkpoint-dir")
    # Our own file, written by save() above: it holds optimizer and RNG state, not only tensors.
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("config", {})
    from .config import all_fields

    # A setting added after the checkpoint was written had its default then.
    defaults = {f.name: f.default for f in all_fields()}
    changed = sorted(k for k in set(saved) | set(config)
                     if k not in MAY_CHANGE and str(saved.get(k, defaults.get(k))) != str(config.get(k)))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"run {run_id} was started with other settings ({shown}); resume it with the same ones")
    return state


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the loop to stop at the next optimizer step, after a checkpoint;
    a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.requested = True

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
