"""5x7 bitmap glyphs for the OCR-like ``detail`` task, defined here (no fonts)."""

from __future__ import annotations

import numpy as np

_ROWS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": ("..#..", ".#.#.", "#...#", "#...#", "#####", "#...#", "#...#"),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
}

GLYPHS: tuple[str, ...] = tuple(_ROWS)
"""Characters that can be drawn: digits 0-9 and the letters A, E, H, X."""


def glyph_bitmap(char: str) -> np.ndarray:
    """Return the glyph of ``char`` as a bool array of shape (7, 5) (rows, columns)."""
    if char not in _ROWS:
        raise ValueError(f"no glyph for {char!r}; valid glyphs: {', '.join(GLYPHS)}")
    return np.array([[c == "#" for c in row] for row in _ROWS[char]], dtype=bool)


def glyph_mask(char: str, scale: int) -> np.ndarray:
    """Return the glyph scaled by an integer factor: bool array of shape (7*scale, 5*scale)."""
    return np.kron(glyph_bitmap(char), np.ones((scale, scale), dtype=bool))
