"""Shared pytest setup: the real-component harness fixtures (tests/harness)."""

pytest_plugins = ["tests.harness.fixtures"]
