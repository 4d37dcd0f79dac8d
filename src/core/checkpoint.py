"""Checkpoints that resume a run exactly: weights, optimizer, schedule, RNG and data order.

One file per run, `<checkpoint_dir>/<run_id>/last.pt`, replaced atomically (a private temp file,
fsynced, then renamed), so a kill or a full disk at any moment leaves the previous complete
checkpoint. The file holds only tensors and plain values and is read with
`torch.load(weights_only=True)`: a planted or older pickled file is refused, never unpickled. A
process training or resuming the run holds `<checkpoint_dir>/<run_id>/lock` (an OS file lock, freed
by the kernel even after kill -9), so a second resume of the same run is refused. The folder is
removed when the run finishes: the trained model is then in MLflow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from ..base.config import ConfigError, all_fields, may_change_on_resume
from .evaluate import Evaluation

FILE = "last.pt"
LOCK = "lock"
# 2: tensors and plain values only. Files without it were written by releases that pickled objects.
FORMAT = 2
class CheckpointError(ConfigError):
    """A checkpoint cannot be written or read; one line, like every refusal the CLI prints."""


def _plain(value: Any) -> Any:
    """Tensors, plain numbers, lists and dicts only."""
    import numpy as np
    import torch

    if hasattr(value, "state_dict"):
        return value.state_dict()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if is_dataclass(value):  # an evaluation
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, np.ndarray):
        return torch.tensor(value)  # a copy: the array may be a read-only view, which torch warns about sharing
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _evaluation(saved: dict | None):

    if saved is None:
        return None
    return Evaluation(**{k: v.numpy() if hasattr(v, "numpy") else v for k, v in saved.items()})


class GlobalRng:
    """Python's, numpy's and torch's global generators, as a component of the state."""

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np
        import torch

        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": [version, list(internal), gauss],
                "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import random

        import numpy as np
        import torch

        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """The training loop's resumable state, in one object: everything the next optimizer step
    depends on, after `batch_index` batches of `epoch`.

    Field names are the checkpoint's keys, written here once: `state_dict` and `load_state_dict`
    both walk the fields. A field holding a component (anything with `state_dict` and
    `load_state_dict`: the model, optimizer, ...) is saved and restored by the component itself;
    a tensor is overwritten in place (it stays on its device); other values are saved as tensors and
    plain numbers, which `torch.load(weights_only=True)` accepts, and assigned back."""

    model: Any  # component: the trainable tensors only
    optimizer: Any
    scheduler: Any
    scaler: Any
    rng_epoch: Any  # component: the generator of batch order, saved as it was when `epoch` began
    counts: Any  # component: samples, real tokens, padded tokens seen; training seconds
    running: Any  # training loss summed on the device since it was last logged
    rng: Any = field(default_factory=GlobalRng)  # python, numpy, torch CPU and CUDA
    epoch: int = 1
    batch_index: int = 0
    step: int = 0
    running_n: int = 0
    best_state: dict | None = None
    best_score: float | None = None
    best_epoch: int = 0
    best_metrics: dict | None = None
    best_val: Any = field(default=None, metadata={"load": _evaluation})  # evaluate.Evaluation
    bad_epochs: int = 0
    history: list = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        for f in fields(self):
            current, value = getattr(self, f.name), state[f.name]
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(value)
            elif isinstance(current, torch.Tensor):
                current.copy_(torch.as_tensor(value))
            else:
                setattr(self, f.name, f.metadata.get("load", lambda v: v)(value))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Checkpointer:
    """One run's checkpoint. Used as a context manager it holds the run's lock until the run ends."""

    def __init__(self, folder: str | Path, run_id: str, config: dict[str, Any]):
        self.folder = Path(folder) / run_id
        self.run_id = run_id
        self.config = config
        self._lock = None

    @property
    def path(self) -> Path:
        return self.folder / FILE

    def __enter__(self) -> Checkpointer:
        from filelock import FileLock, Timeout

        # filelock rather than bare fcntl.flock: it also locks on Windows, and it retries when the
        # holder deletes the lock file between our open and our lock (remove() does, at the end).
        lock = FileLock(self.folder / LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise CheckpointError(f"run {self.run_id} is being trained or resumed by another process (it holds "
                                  f"{self.folder / LOCK}); wait for that process to end, or stop it, then resume "
                                  f"again") from None
        self._lock = lock
        # Temp files of a writer killed mid-save: with the lock held, nobody else writes here.
        for stale in self.folder.glob(f"{FILE}.*.tmp"):
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if not self.path.is_file():
                self.remove()  # a run that ended before its first save leaves no folder behind

    def save(self, state: TrainState) -> None:
        import torch

        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{FILE}.", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "wb") as f:
                torch.save({"format": FORMAT, "run_id": self.run_id, "config": self.config,
                            "state": state.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
            os.replace(tmp, self.path)
            tmp = None
            _fsync_folder(self.folder)  # the rename itself survives a power cut
        except BaseException as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(exc, OSError):
                raise CheckpointError(f"cannot write the checkpoint of run {self.run_id} to {self.folder} "
                                      f"({exc.strerror or exc}); its last complete checkpoint is kept: free space "
                                      f"or fix the folder, then resume with --resume-run-id {self.run_id}") from exc
            raise

    def load(self) -> dict[str, Any]:
        """The checkpoint's state (for `TrainState.load_state_dict`), read without unpickling anything
        and checked against the resuming settings."""
        saved = self._read()
        check_settings(saved.get("config", {}), self.config, self.run_id)
        state = saved.get("state")
        missing = [key for key in TrainState.keys() if not isinstance(state, dict) or key not in state]
        if missing:
            raise CheckpointError(f"checkpoint {self.path} lacks {missing[0]!r}; it was not written by this release: "
                                  f"delete {self.folder} and train the run again")
        return state

    def check_exists(self) -> None:
        if not self.path.is_file():
            raise ConfigError(f"no checkpoint for run {self.run_id} at {self.path}; check --resume-run-id and "
                              f"--checkpoint-dir")

    def _read(self) -> dict[str, Any]:
        import pickle

        import torch

        self.check_exists()  # again under the lock: a process that held it may have finished the run
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"checkpoint {self.path} holds pickled Python objects, which are never loaded "
                                  f"(they could run code); it was written by an earlier release or not by this "
                                  f"program: delete {self.folder} and train the run again") from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.path} is damaged ({str(exc).splitlines()[0][:200]}); delete "
                                  f"{self.folder} and train the run again") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise CheckpointError(f"checkpoint {self.path} has format {found}, this release reads {FORMAT}: delete "
                                  f"{self.folder} and train the run again")
        return saved

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # only if no other run keeps a checkpoint there
        except OSError:
            pass


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; NTFS journals the rename
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resumable(folder: str | Path, run_id: str, config: dict[str, Any]) -> Checkpointer:
    """The checkpointer of an interrupted run, checked before its lock is taken (which would create
    the folder)."""
    saver = Checkpointer(folder, run_id, config)
    saver.check_exists()
    return saver


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


def check_settings(saved: dict[str, Any], config: dict[str, Any], run_id: str) -> None:
    """The resuming command must use the settings the run was started with."""

    # A setting added after the checkpoint was written had its default then.
    defaults = {f.name: f.default for f in all_fields()}
    changed = sorted(k for k in set(saved) | set(config)
                     if k not in may_change_on_resume() and str(saved.get(k, defaults.get(k))) != str(config.get(k)))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"run {run_id} was started with other settings ({shown}); resume it with the same ones")
