"""The Hugging Face Hub as the model and data source: is it reachable, and what to do when it is not.

A name that is not a local folder or file comes from the hub (or its local cache). Without network,
transformers and datasets retry the hub for half a minute before they fail; one short probe first
answers in a second, and then the cache alone is read (HF_HUB_OFFLINE=1 for this process), so a
cached model and dataset still load and a missing one fails at once, with a hint that is true
whichever way offline came about. Standard library only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROBE_TIMEOUT = 3.0
UNREACHABLE = "IMDB_SENTIMENT_HUB_UNREACHABLE"  # set by `check` for the hint, and for child processes


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def remote(names: list[str]) -> list[str]:
    return [n for n in names if n and not Path(n).exists()]


def reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Any HTTP answer of the hub's endpoint counts (401 and 404 too): only the network is in question."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def check(names: list[str]) -> None:
    """Before anything loads from the hub: when it does not answer, read the local cache only."""
    if not remote(names) or offline() or os.environ.get(UNREACHABLE):
        return
    if reachable():
        return
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", UNREACHABLE: "1"})
    # Libraries read these when imported; any already imported are told directly.
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def why(name: str) -> str:
    """Why `name` could not come from the hub, when that is the reason, as the start of a hint."""
    if os.environ.get(UNREACHABLE):
        return (f"the Hugging Face Hub ({endpoint()}) does not answer and {name!r} is not in the local cache "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it once on a "
                f"connected machine, or")
    if offline():
        return (f"HF_HUB_OFFLINE is set, so only the local Hugging Face cache is read and {name!r} is not in it; "
                f"unset it on a connected machine to download it once, or")
    return "check the name and your network, or"


def local_files_fix() -> str:
    """The way to local files, spelled for the command that was typed: make, `mlflow run` or the CLI."""
    files = {"train_data": "/abs/train.parquet", "test_data": "/abs/test.parquet", "model": "/abs/model-folder"}
    project = " ".join(f"-P {k}={v}" for k, v in files.items())
    if os.environ.get("IMDB_SENTIMENT_MAKE_TARGET"):
        how = f'run `make {os.environ["IMDB_SENTIMENT_MAKE_TARGET"]} ARGS="{project}"`'
    elif os.environ.get("MLFLOW_RUN_ID"):
        how = f"add `{project}` to `mlflow run`"
    else:
        how = "pass " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in files.items())
    return f"{how} (the model must be local too: a folder written by save_pretrained)"


def hint(name: str) -> str:
    return f"{why(name)} use local files: {local_files_fix()}"
