"""The error page's colours and the WCAG 2 contrast maths that keeps them readable.

:data:`PALETTE` is the built-in page's light and dark colours; :func:`ink` darkens (or
lightens) a brand's accent colour just enough for links and the button to reach WCAG AA
on it, keeping the brand's hue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["PALETTE", "contrast_ratio", "ink"]

# The default page's colours. Body text is near-black on white (17:1) or near-white on
# near-black in dark mode; "muted" text still reaches 7:1. tests/test_render.py checks
# every foreground/background pair against WCAG AA.
PALETTE: Final[Mapping[str, Mapping[str, str]]] = {
    "light": {
        "bg": "#f3f4f6",
        "card": "#ffffff",
        "text": "#111827",
        "muted": "#4b5563",
        "line": "#d1d5db",
        "code": "#f3f4f6",
        "debug": "#fffbeb",
        "debug_line": "#b45309",
    },
    "dark": {
        "bg": "#030712",
        "card": "#111827",
        "text": "#f9fafb",
        "muted": "#d1d5db",
        "line": "#374151",
        "code": "#1f2937",
        "debug": "#1c1917",
        "debug_line": "#f59e0b",
    },
}


def _rgb(colour: str) -> tuple[int, int, int]:
    digits = colour[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def _luminance(colour: str) -> float:
    """WCAG 2 relative luminance."""

    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in _rgb(colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two ``#rgb`` / ``#rrggbb`` colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def ink(accent: str, background: str, toward: str, minimum: float = 4.5) -> str:
    """``accent`` mixed toward ``toward`` just enough to reach ``minimum`` contrast.

    Links and the button are drawn in this colour, so a pale brand colour still gives
    readable links (WCAG 1.4.3) while keeping its hue.
    """
    start, end = _rgb(accent), _rgb(toward)
    for step in range(21):
        t = step / 20
        mixed = "#" + "".join(
            f"{round(a + (b - a) * t):02x}" for a, b in zip(start, end, strict=True)
        )
        if contrast_ratio(mixed, background) >= minimum:
            return mixed
    return toward
