"""``key=value`` command-line overrides of the bench scripts, values read as Python literals."""
from __future__ import annotations

import argparse
import ast
from typing import Any


def value(text: str) -> Any:
    """``"1e-3"`` -> 0.001, ``"False"`` -> False; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; an item without ``=`` is a usage error."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"override {item!r} is not key=value")
        overrides[key] = value(text)
    return overrides
