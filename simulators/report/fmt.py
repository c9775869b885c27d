"""Numbers as a reader wants them: units attached, separators in counts, a dash for none.

Every value the report shows passes through one of these, so no table cell holds a
raw float, dict or list. Each takes ``None`` (or NaN) and returns :data:`NONE`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["NONE", "count", "pct", "pp", "signed_pct", "ratio", "ms", "seconds", "per_s", "fixed", "p_value",
           "interval", "duration"]

#: What an absent figure reads as.
NONE = "–"


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def count(n: Any) -> str:
    """A count with thousands separators.

    >>> count(12345), count(None)
    ('12,345', '–')
    """
    return NONE if _missing(n) else f"{int(n):,}"


def pct(x: Any, digits: int = 2) -> str:
    """A rate in [0, 1] as a percentage.

    >>> pct(0.07674)
    '7.67%'
    """
    return NONE if _missing(x) else f"{100.0 * x:.{digits}f}%"


def pp(x: Any, digits: int = 2) -> str:
    """A difference of two rates, signed, in percentage points.

    >>> pp(-0.017815), pp(0.0)
    ('−1.78 pp', '+0.00 pp')
    """
    return NONE if _missing(x) else _sign(f"{100.0 * x:+.{digits}f}") + " pp"


def signed_pct(x: Any, digits: int = 1) -> str:
    """A relative change, signed.

    >>> signed_pct(0.232)
    '+23.2%'
    """
    return NONE if _missing(x) else _sign(f"{100.0 * x:+.{digits}f}") + "%"


def ratio(x: Any) -> str:
    """A ratio of two rates.

    >>> ratio(1.7834)
    '1.78×'
    """
    return NONE if _missing(x) else f"{x:.2f}×"


def ms(x: Any) -> str:
    """Milliseconds.

    >>> ms(5.3175), ms(19.9)
    ('5.3 ms', '20 ms')
    """
    if _missing(x):
        return NONE
    return f"{x:.1f} ms" if abs(x) < 10 else f"{x:,.0f} ms"


def seconds(x: Any) -> str:
    """Seconds, with a precision that suits the size.

    >>> seconds(0.944), seconds(17.36), seconds(184.2)
    ('0.94 s', '17.4 s', '184 s')
    """
    if _missing(x):
        return NONE
    return f"{x:.2f} s" if abs(x) < 10 else f"{x:.1f} s" if abs(x) < 100 else f"{x:,.0f} s"


def duration(x: Any) -> str:
    """A length of time, in the largest unit that keeps it readable.

    >>> duration(42.0), duration(190.0), duration(9000.0)
    ('42 s', '3.2 min', '2.5 h')
    """
    if _missing(x):
        return NONE
    if x < 120:
        return f"{x:.0f} s"
    return f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.1f} h"


def per_s(x: Any, unit: str = "req/s") -> str:
    """A rate per second.

    >>> per_s(11.84), per_s(1234.5, "samples/s")
    ('11.8 req/s', '1,234 samples/s')
    """
    if _missing(x):
        return NONE
    return f"{x:.1f} {unit}" if abs(x) < 100 else f"{x:,.0f} {unit}"


def fixed(x: Any, digits: int = 3) -> str:
    """A unitless figure (AUC, log-loss, p-value) with fixed decimals.

    >>> fixed(0.7420), fixed(0.0001234)
    ('0.742', '0.000123')
    """
    if _missing(x):
        return NONE
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def p_value(x: Any) -> str:
    """A p-value, with the tiny ones bounded rather than written out.

    >>> p_value(0.2745), p_value(3.9e-33)
    ('0.275', '< 0.001')
    """
    if _missing(x):
        return NONE
    return "< 0.001" if x < 0.001 else f"{x:.3f}"


def interval(low: Any, high: Any, fmt: Callable[[Any], str]) -> str:
    """An interval, each end in ``fmt``; a dash unless both ends are known.

    >>> interval(0.049, 0.104, pct)
    '[4.90%, 10.40%]'
    >>> interval(None, 0.1, pct)
    '–'
    """
    if _missing(low) or _missing(high):
        return NONE
    return f"[{fmt(low)}, {fmt(high)}]"


def _sign(text: str) -> str:
    """A true minus sign for negative figures (and no '-0.00')."""
    if text.startswith("-") and float(text) == 0:
        return "+" + text[1:]
    return text.replace("-", "−", 1)
