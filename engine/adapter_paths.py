"""Where an adapter may be loaded from: only directories whose real path lies under the LoRA root.

A request names a path relative to the root (or an absolute one inside it). Refused, before anything
is read: a `..` component, an absolute path outside the root, and a path that a symlink carries
outside the root (checked on the fully resolved real path, so links inside links are covered).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath

from engine.errors import InvalidRequestError


class AdapterNotFoundError(InvalidRequestError):
    """The named adapter (or its directory) does not exist; HTTP 404."""


def resolve_adapter_path(lora_root: str | os.PathLike, lora_path: object) -> Path:
    """The real directory `lora_path` names under `lora_root`; raises InvalidRequestError/AdapterNotFoundError."""
    if not isinstance(lora_path, str) or not lora_path.strip():
        raise InvalidRequestError("lora_path must be a non-empty string (a directory under the LoRA root)",
                                  "lora_path")
    if "\x00" in lora_path:
        raise InvalidRequestError("lora_path contains a NUL byte", "lora_path")
    given = PurePath(lora_path)
    if ".." in given.parts:
        raise InvalidRequestError(f"lora_path {lora_path!r} contains '..'; name a directory under the LoRA root "
                                  "without parent references", "lora_path")
    root = Path(os.path.realpath(lora_root))
    candidate = Path(lora_path) if given.is_absolute() else root / given
    real = Path(os.path.realpath(candidate))
    if not _inside(real, root):
        if given.is_absolute() and not _inside(Path(os.path.abspath(candidate)), root):
            raise InvalidRequestError(f"lora_path {lora_path!r} is an absolute path outside the LoRA root; "
                                      "adapters load only from under the root", "lora_path")
        raise InvalidRequestError(f"lora_path {lora_path!r} resolves through a symlink to outside the LoRA root; "
                                  "adapters load only from under the root", "lora_path")
    if not real.exists():
        raise AdapterNotFoundError(f"adapter directory {lora_path!r} does not exist under the LoRA root",
                                   "lora_path")
    if not real.is_dir():
        raise InvalidRequestError(f"lora_path {lora_path!r} is not a directory; give the adapter's directory "
                                  "(holding adapter_config.json and adapter_model.safetensors)", "lora_path")
    return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
