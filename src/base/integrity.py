"""What a model folder may hold and how its files are named by digest: sha256 of each file, one
digest of a whole manifest, and the refusal of code. Standard library only: the training side
(a --model folder) and the serving side (a logged model) check folders the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ConfigError


def file_digest(path: Path) -> str:
    # hashlib.file_digest does this from Python 3.11; pyproject.toml still admits 3.10.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(root: Path) -> dict[str, str]:
    """{path under the model folder: sha256} of every file of `root/artifacts` (what `load` reads)."""
    return {p.relative_to(root).as_posix(): file_digest(p)
            for p in sorted((root / "artifacts").rglob("*")) if p.is_file()}


def manifest_digest(files: dict[str, str]) -> str:
    """One sha256 naming a whole manifest: a registered version records it beside its decision."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def weights_digest(folder: Path) -> str:
    """sha256 over a model folder's safetensors files (a LoRA base), by name and content."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} holds no safetensors weights")
    return manifest_digest({p.name: file_digest(p) for p in files})


def refuse_code(folder: Path, where: str) -> None:
    """A model folder must hold data only: a `.py` file or an `auto_map` entry would have transformers
    import code from it (with trust_remote_code, or at a prompt)."""
    code = sorted(p.name for p in folder.rglob("*") if p.suffix in (".py", ".pyc", ".so"))
    mapped = sorted(p.name for p in folder.rglob("*.json") if '"auto_map"' in p.read_text(errors="replace"))
    if code or mapped:
        found = ", ".join(code + [f"auto_map in {m}" for m in mapped])
        raise ConfigError(f"{where} holds code ({found}); models are loaded from weights and JSON only, never "
                          f"with custom code: re-save the model without it")
