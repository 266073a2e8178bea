"""On/off environment switches share one vocabulary (engine.config.env_switch)."""
from __future__ import annotations

import logging

import pytest

from engine.config import env_switch
from engine.kernels._dispatch import triton_disabled


@pytest.mark.parametrize("value,want", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                        ("0", False), ("False", False), ("no", False), ("OFF", False),
                                        ("", None)])
def test_values(monkeypatch, value, want):
    monkeypatch.setenv("EMBER_TEST_SWITCH", value)
    assert env_switch("EMBER_TEST_SWITCH") is want


def test_unset_and_unknown_values_leave_the_default_and_unknown_ones_are_logged(monkeypatch, caplog):
    monkeypatch.delenv("EMBER_TEST_SWITCH", raising=False)
    assert env_switch("EMBER_TEST_SWITCH") is None
    monkeypatch.setenv("EMBER_TEST_SWITCH", "enabled")
    with caplog.at_level(logging.WARNING):
        assert env_switch("EMBER_TEST_SWITCH") is None
        assert env_switch("EMBER_TEST_SWITCH") is None
    assert caplog.text.count("EMBER_TEST_SWITCH='enabled'") == 1  # once, however often it is read


@pytest.mark.parametrize("value,want", [("1", True), ("on", True), ("off", False), ("0", False), ("", False)])
def test_disable_triton_reads_the_same_vocabulary(monkeypatch, value, want):
    monkeypatch.setenv("EMBER_DISABLE_TRITON", value)
    assert triton_disabled() is want
