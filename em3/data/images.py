"""Images for items that have none, and real photographs for tests.

MovieLens-100K ships no posters and nothing can be downloaded here, so
:func:`render_poster` draws a **synthetic** poster per movie, deterministically from
its metadata: one colour band per genre (a fixed palette), a background tone from
the release year, and a shape placed by a hash of the title. It carries the same
information as the text (genres, year), in pixels; it is there to exercise the image
path end to end, not to claim that posters help. Real photographs for tests come
from scikit-learn's bundled sample JPEGs (:func:`sample_photos`).
"""
from __future__ import annotations

import hashlib
import io
from typing import Sequence

__all__ = ["GENRE_COLOURS", "render_poster", "sample_photos"]

# A fixed, distinct colour per MovieLens genre (unknown genres hash to a colour).
GENRE_COLOURS: dict[str, tuple[int, int, int]] = {
    "Action": (220, 40, 40), "Adventure": (240, 140, 20), "Animation": (250, 220, 40),
    "Children's": (150, 230, 80), "Comedy": (40, 200, 120), "Crime": (30, 30, 30),
    "Documentary": (120, 120, 120), "Drama": (60, 90, 200), "Fantasy": (170, 80, 220),
    "Film-Noir": (70, 50, 60), "Horror": (120, 0, 0), "Musical": (240, 120, 200),
    "Mystery": (40, 40, 120), "Romance": (250, 150, 160), "Sci-Fi": (20, 200, 230),
    "Thriller": (130, 60, 20), "War": (90, 110, 60), "Western": (200, 160, 100),
    "unknown": (200, 200, 200),
}


def _colour_of(genre: str) -> tuple[int, int, int]:
    if genre in GENRE_COLOURS:
        return GENRE_COLOURS[genre]
    h = hashlib.blake2b(genre.encode(), digest_size=3).digest()
    return (h[0], h[1], h[2])


def render_poster(title: str, year: int | None, genres: Sequence[str], size: int = 96) -> bytes:
    """A deterministic synthetic poster (PNG bytes, ``size`` x ``size``) for a movie.

    >>> render_poster("Toy Story", 1995, ["Animation", "Comedy"]) == render_poster("Toy Story", 1995, ["Animation", "Comedy"])
    True
    """
    from PIL import Image, ImageDraw

    if size < 8:
        raise ValueError(f"size must be >= 8, but {size} is given")
    tone = 40 + int(((year or 1950) - 1920) * 2.5) % 200  # older films darker
    img = Image.new("RGB", (size, size), (tone, tone, tone))
    draw = ImageDraw.Draw(img)
    bands = list(genres) or ["unknown"]
    band_h = max(1, size // (2 * len(bands)))
    for i, genre in enumerate(bands):  # genre bands across the lower half
        y0 = size // 2 + i * band_h
        draw.rectangle([0, y0, size - 1, min(size - 1, y0 + band_h - 1)], fill=_colour_of(genre))
    h = hashlib.blake2b(title.encode(), digest_size=4).digest()
    cx, cy, r = h[0] % size, h[1] % (size // 2), 4 + h[2] % max(1, size // 6)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_colour_of(bands[0]), outline=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def sample_photos(size: int | None = None) -> list[bytes]:
    """scikit-learn's two bundled sample photographs (a temple, a flower) as JPEG bytes.

    Needs scikit-learn (the ``dev`` extra). ``size`` optionally downsizes them.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for arr in load_sample_images().images:
        img = Image.fromarray(arr)
        if size is not None:
            img = img.resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
