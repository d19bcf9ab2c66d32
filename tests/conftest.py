"""Shared pytest configuration.

Process-level tests are marked `slow`; they stay in the suite (CI runs everything), the mark only
lets a developer run `pytest -m "not slow"` for a quick loop.
"""
