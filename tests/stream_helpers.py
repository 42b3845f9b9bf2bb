"""Helpers shared by the streaming-parser tests (reasoning, tool calls): text fed in pieces."""

from __future__ import annotations


def text_pieces(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at the given positions (out-of-range and repeated cuts ignored), in order: how a
    stream of decoded tokens might deliver it."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]
