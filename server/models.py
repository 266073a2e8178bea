"""Which model a request's `model` field names: the one place that maps names to what runs.

Today that is the base model under its served name. Adapters will register here too: `resolve`
then returns the adapter's name in `Target.adapter`, and every route already passes it on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from server.errors import model_not_found
from server.metrics import BASE
from server.protocol.misc import ModelCard


@dataclass(frozen=True)
class Target:
    """What runs a request: the served base model, optionally with an adapter."""

    model: str
    adapter: str | None = None

    @property
    def adapter_label(self) -> str:
        return self.adapter or BASE


class ModelRegistry:
    """The served names this server answers to."""

    def __init__(self, served_name: str, root: str | None, max_model_len: int | None = None):
        self.served_name = served_name
        self.root = root
        self.max_model_len = max_model_len
        self.created = int(time.time())

    def resolve(self, name: str | None) -> Target:
        """The target of a request's `model` field; None means the served model. Unknown names: 404."""
        if name is None or name == self.served_name:
            return Target(self.served_name)
        raise model_not_found(name)

    def cards(self) -> list[ModelCard]:
        return [ModelCard(id=self.served_name, created=self.created, root=self.root,
                          max_model_len=self.max_model_len)]
