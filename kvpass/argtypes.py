"""argparse types shared by the CLI's subcommands (no torch import: ``kvpass check`` must stay light)."""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "non_negative_int"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


positive_int.__name__ = non_negative_int.__name__ = "integer"  # argparse: "invalid integer value: 'x'"
