"""The one error type for unusable data: its message names the problem and the fix."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that is missing or unusable; the message says how to fix it."""
