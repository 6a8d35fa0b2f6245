"""Fixtures the output builders' tests share (defined in builders.py beside the helpers)."""

from tests.unit.worker.outputs.builders import built  # noqa: F401  (a fixture: registered by import)
