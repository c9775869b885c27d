import io

import pytest
from PIL import Image

from em3.data import click_histories, load_ml100k, render_poster


@pytest.fixture(scope="module")
def ml():
    return load_ml100k(image_size=32)


def test_the_real_dataset(ml):
    assert len(ml.samples) == 100_000 and len(ml.items) == 1682
    assert len({s.impression.user_id for s in ml.samples}) == 943
    times = [s.impression.served_at for s in ml.samples]
    assert times == sorted(times)
    rate = sum(s.label for s in ml.samples) / len(ml.samples)
    assert rate == pytest.approx(0.55375)
    assert ml.items["1"].text == "Toy Story (1995) | Animation Children's Comedy"
    first = ml.samples[0].impression
    assert isinstance(first.user_id, str) and set(first.context) == {"age", "gender", "occupation"}


def test_posters_are_deterministic_images(ml):
    img = Image.open(io.BytesIO(ml.items["1"].image))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert render_poster("Toy Story", 1995, ["Animation"], 32) == render_poster("Toy Story", 1995, ["Animation"], 32)
    assert render_poster("Toy Story", 1995, ["Animation"], 32) != render_poster("Heat", 1995, ["Crime"], 32)


def test_histories_hold_only_earlier_clicks(ml):
    samples = ml.samples[:5000]
    hist = click_histories(samples, 100)
    clicked_at = {}
    for s in samples:
        if s.label:
            clicked_at.setdefault((s.impression.user_id, s.impression.item_id), s.impression.served_at)
    for s, h in zip(samples, hist):
        assert len(h) <= 100
        for item in h:
            assert clicked_at[(s.impression.user_id, item)] < s.impression.served_at


def test_max_events():
    assert len(load_ml100k(images=False, max_events=10).samples) == 10
