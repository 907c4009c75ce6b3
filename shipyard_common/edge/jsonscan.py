"""A cheap look at a JSON body's shape before anything parses it: how deep it nests, how many values.

Python's ``json`` (which FastAPI parses bodies with) recurses once per level and raises
``RecursionError`` near a thousand levels, which surfaced as a 500; a body of millions of small
values costs far more memory parsed than its bytes. This scan works on the bytes with C-speed
``bytes`` and ``re`` operations only (no Python loop per byte): escapes are dropped, then
everything but quotes, brackets and commas, then strings, leaving the brackets and commas that
are structure, whose running count of open brackets (numpy) is the nesting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# After escapes are gone a string is a quote, anything but a quote, a quote: no backtracking, and
# an unterminated one (the last quote of the body) is tried once.
_STRING = re.compile(rb'"[^"]*"')
# What the shape depends on: brackets and commas, and the quotes that say which of them are text.
_DELETE = bytes(b for b in range(256) if b not in b'"[]{},')
# Objects' braces as arrays' brackets (nesting depth does not care which); commas dropped.
_SQUARE = bytes.maketrans(b"{}", b"[]")


@dataclass(frozen=True)
class JsonLimits:
    """The deepest nesting and the most values a JSON body may have; 0 turns a check off."""

    max_depth: int = 64
    max_values: int = 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.max_depth or self.max_values)


def _structure(body: bytes) -> bytes:
    """The brackets and commas of ``body`` that are outside its strings, in order."""
    if b"\\" in body:
        # Inside a string every backslash starts an escape, so pairs of them, then escaped quotes,
        # go first, left to right: what remains of a string is its two quotes and its text.
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = body.translate(None, _DELETE)
    if b'"' in kept:
        # Two adjacent quotes close a string and open the next (or hold an empty one) with nothing
        # structural between: dropping them leaves the rest's meaning. Strings holding brackets or
        # commas are left for the expression.
        kept = kept.replace(b'""', b"")
        if b'"' in kept:
            kept = _STRING.sub(b"", kept)
    return kept


def _within(brackets: bytes, rounds: int) -> bool:
    """Whether ``brackets`` nest at most ``rounds`` deep, by removing the innermost pairs (``[]``)
    that many times: for the usual shallow body, quicker than :func:`_depth`'s arrays."""
    for _ in range(rounds):
        if not brackets:
            return True
        brackets = brackets.replace(b"[]", b"")
    return not brackets


def _depth(brackets: bytes) -> int:
    """How deep ``brackets`` (only ``[`` and ``]``) nest: the highest running count of open ones,
    which is as deep as a parser gets before it answers or fails."""
    if not brackets:
        return 0
    steps = 92 - np.frombuffer(brackets, dtype=np.int8)  # "[" is 91: +1; "]" is 93: -1
    return int(np.cumsum(steps, dtype=np.int32).max())


def check_json_shape(body: bytes, limits: JsonLimits) -> str | None:
    """Why ``body`` is refused (a sentence for the caller), or None when it is within ``limits``."""
    structure = _structure(body)
    brackets = structure.translate(_SQUARE, b",")
    if limits.max_values:
        # Array elements and object members are separated by commas: values ≈ commas + containers + 1.
        values = len(structure) - len(brackets) + brackets.count(b"[") + 1
        # Unless it opens too many in a row: then depth is what to tell (bodies like "[[[[…").
        deep_run = bool(limits.max_depth) and b"[" * (limits.max_depth + 1) in brackets
        if values > limits.max_values and not deep_run:
            return (f"the JSON body holds about {values} values; at most {limits.max_values} are "
                    "accepted in one request")
    if not limits.max_depth or (len(brackets) <= 4096 and _within(brackets, min(8, limits.max_depth))):
        return None
    depth = _depth(brackets)
    if depth > limits.max_depth:
        return (f"the JSON body nests arrays or objects {depth} levels deep; "
                f"at most {limits.max_depth} are accepted")
    return None
