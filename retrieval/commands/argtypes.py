"""Argument types the commands share: a bad value is argparse's usage error naming the option."""
from __future__ import annotations

import argparse

MIN_IMAGE_SIZE = 32  # a backbone's five stride-2 stages leave one cell; below, the first layer fails


def parsed(text: str, cast, what: str):
    """``cast(text)``, or argparse's type error saying the text is not ``what``."""
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def at_least(low: int):
    """An ``int`` type for argparse that refuses values under ``low``."""
    def parse(text: str) -> int:
        value = parsed(text, int, "a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is under {low}")
        return value
    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


image_size = at_least(MIN_IMAGE_SIZE)


def number_above(low: float, inclusive: bool = False):
    """A ``float`` type for argparse that refuses values under ``low`` (or at it, unless ``inclusive``)."""
    def parse(text: str) -> float:
        value = parsed(text, float, "a number")
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"{value:g} is not {'at least' if inclusive else 'above'} {low:g}")
        return value
    parse.__name__ = "float"
    return parse


def share_below_one(text: str) -> float:
    """A ``float`` type for argparse: a share of at least 0 and under 1 (``--val-fraction``)."""
    value = parsed(text, float, "a number")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not a share from 0 up to (not including) 1")
    return value


def share_up_to_one(text: str) -> float:
    """A ``float`` type for argparse: a share above 0 and at most 1 (a probability to act on, a cosine)."""
    value = parsed(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not a share above 0 and up to 1")
    return value
