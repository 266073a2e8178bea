"""Where and when a model was built, for the model cards: "one NVIDIA H200, 2026-11-28".

The training scripts write the card right after training on the same machine, so the machine the card
writer sees is the one that trained, unless the config pinned training to the CPU.
"""
from __future__ import annotations

import datetime
import os


def hardware(device: str = "auto") -> str:
    """Describe the training hardware: the GPU model and count, or the CPU core count.

    `device` is the training config's `train.device`; "cpu" means no GPU took part even if one is present.
    """
    import torch  # only here: the adapter card writer needs nothing else from torch

    if device != "cpu" and torch.cuda.is_available():
        count, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        return f"one {name}" if count == 1 else f"a machine with {count} x {name}"
    return f"a {os.cpu_count()}-core CPU"


def built_on(device: str = "auto", override: str | None = None) -> str:
    """`hardware(device)` (or `override`, when given) followed by today's UTC date."""
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return f"{override or hardware(device)}, {today}"
