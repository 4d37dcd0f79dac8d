"""Scoring a sequence classifier: batches sorted by length, padding, the forward pass, calibration.

Needs torch and numpy only (a tokenizer is handed in as an object): the training loop's evaluation and
the served model both score through here, and a logged model ships this file, not the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def pick_device(setting: str = "auto") -> torch.device:
    """'auto': the current GPU when there is one, else the CPU; anything else as given."""
    if setting != "auto":
        device = torch.device(setting)
        if device.type == "cuda":  # 'cuda' alone is the current GPU; set_device wants an index
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host memory makes the copy asynchronous, so the host never waits on the GPU here."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def lengths_of(input_ids: list[np.ndarray]) -> np.ndarray:
    return np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Longest first: padding stays minimal and memory peaks at the first batch."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad(seqs: list[np.ndarray], pad_id: int, multiple_of: int = 1, cap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) padded to the longest sequence, rounded up to `multiple_of` and
    at most `cap` (0 = no cap): rounding must not pad past the model's positions."""
    width = -(-max(len(s) for s in seqs) // multiple_of) * multiple_of
    width = min(width, cap) if cap else width
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = s
        mask[row, :len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.inference_mode()
def logits(model, input_ids: list[np.ndarray], batch_size: int, pad_id: int, device: torch.device,
           dtype: torch.dtype = torch.float32, multiple_of: int = 1,
           on_batch: Callable[[int], None] | None = None, cap: int = 0) -> torch.Tensor:
    """The model's logits (float32, on `device`) for every sequence, in input order. Batches go
    longest first and stay on the device until one concatenation at the end."""
    model.eval()
    parts, order = [], []
    for idx in sorted_batches(lengths_of(input_ids), batch_size):
        ids, mask = pad([input_ids[i] for i in idx], pad_id, multiple_of, cap)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=to_device(ids, device), attention_mask=to_device(mask, device))
        parts.append(out.logits.float())
        order.append(idx)
        if on_batch is not None:
            on_batch(len(idx))
    stacked = torch.cat(parts)
    restored = torch.empty_like(stacked)
    restored[torch.from_numpy(np.concatenate(order)).to(device)] = stacked
    return restored


def probabilities(scores: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) as float64 on the host; T = 1 is the uncalibrated model."""
    return torch.softmax(scores.double() / temperature, dim=-1).cpu().numpy()


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from the probabilities themselves: log p differs from the logits by a
    per-row constant, which the softmax cancels."""
    z = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
