"""Which model a request's `model` field names: the one place that maps names to what runs.

The base model answers to its served name; a loaded adapter answers to its own name (`resolve`
returns it in `Target.adapter`, and every route passes it on to the engine).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from server.errors import model_not_found
from server.lora import AdapterLabels
from server.metrics import BASE
from server.protocol.misc import ModelCard


@dataclass(frozen=True)
class Target:
    """What runs a request: the served base model, optionally with an adapter."""

    model: str
    adapter: str | None = None
    label: str | None = None  # the adapter's metric label ("other" past the cap)

    @property
    def adapter_label(self) -> str:
        return self.label or self.adapter or BASE


class ModelRegistry:
    """The served names this server answers to."""

    def __init__(self, served_name: str, root: str | None, max_model_len: int | None = None):
        self.served_name = served_name
        self.root = root
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self.adapters: Any = None  # the engine's AdapterRegistry when adapters are served
        self.labels = AdapterLabels(8)

    def resolve(self, name: str | None) -> Target:
        """The target of a request's `model` field; None means the served model. Unknown names: 404."""
        if name is None or name == self.served_name:
            return Target(self.served_name)
        if self.adapters is not None and self.adapters.has(name):
            return Target(name, adapter=name, label=self.labels.label(name))
        raise model_not_found(name)

    def cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.served_name, created=self.created, root=self.root,
                           max_model_len=self.max_model_len)]
        for a in self.adapters.adapters() if self.adapters is not None else ():
            cards.append(ModelCard(id=a.name, created=a.created, root=a.path, parent=self.served_name,
                                   max_model_len=self.max_model_len))
        return cards
