"""Ember's Python clients: httpx only, nothing else of Ember imported, usable on their own."""
from clients._common import EmberAPIError, RetryPolicy
from clients.async_client import AsyncEmberClient
from clients.client import EmberClient

__all__ = ["AsyncEmberClient", "EmberAPIError", "EmberClient", "RetryPolicy"]
