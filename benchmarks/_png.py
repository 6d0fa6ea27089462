"""A horizontal bar chart written as a PNG with the standard library only.

Benchmarks plot with matplotlib where it is installed; on machines without it (this project's CI
image has none) they fall back to this: bars, their values and labels in a 3x5 pixel font, no
anti-aliasing. Enough to read a benchmark's result at a glance next to its JSON.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# 3x5 glyphs, rows top to bottom; lower-case letters are drawn as upper-case.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001010010", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101",
    "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", ",": "000000000010100",
    "+": "000010111010000", "-": "000000111000000", ":": "000010000010000",
    "/": "001001010100100", "=": "000111000111000", "(": "001010010010001",
    ")": "100010010010100", "[": "011010010010011", "]": "110010010010110",
    "%": "101001010100101",
}  # fmt: skip

SCALE = 2  # pixels per font pixel
CHAR_W = 4 * SCALE  # 3 columns and a gap
LINE_H = 8 * SCALE


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        x0, x1 = max(0, x0), min(self.width, x1)
        row = bytes(rgb) * max(0, x1 - x0)
        for y in range(max(0, y0), min(self.height, y1)):
            start = (y * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, s: str, rgb=(0, 0, 0)) -> None:
        for i, ch in enumerate(s.upper()):
            glyph = _FONT.get(ch, _FONT[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    px = x + i * CHAR_W + (bit % 3) * SCALE
                    py = y + (bit // 3) * SCALE
                    self.rect(px, py, px + SCALE, py + SCALE, rgb)

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def bar_chart(
    path: Path,
    title: str,
    panels: list[tuple[str, list[tuple[str, float, tuple[int, int, int]]]]],
    *,
    width: int = 900,
) -> None:
    """Write ``panels`` (each ``(caption, [(label, value, rgb), ...])``) as stacked horizontal
    bar charts under ``title``; each bar is annotated with its value."""
    label_w = max(len(label) for _, bars in panels for label, _, _ in bars) * CHAR_W + 12
    bar_h = LINE_H + 4
    height = LINE_H * 2 + sum(LINE_H * 2 + len(bars) * (bar_h + 4) + 8 for _, bars in panels)
    canvas = _Canvas(width, height)
    canvas.text(8, 6, title)
    y = LINE_H * 2
    for caption, bars in panels:
        canvas.text(8, y, caption, (60, 60, 60))
        y += LINE_H + 4
        top = max(value for _, value, _ in bars) or 1.0
        room = width - label_w - 8 * CHAR_W - 16
        for label, value, rgb in bars:
            canvas.text(8, y + 2, label)
            length = int(room * value / top)
            canvas.rect(label_w, y, label_w + length, y + bar_h - 2, rgb)
            canvas.text(label_w + length + 6, y + 2, f"{value:.1f}")
            y += bar_h + 4
        y += LINE_H
    Path(path).write_bytes(canvas.png())
