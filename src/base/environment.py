"""Facts of the process's environment that several layers read. Standard library only."""

from __future__ import annotations

import os


def launched() -> bool:
    """Started by torchrun or `accelerate launch` (they set LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
