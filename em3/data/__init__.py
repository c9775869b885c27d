"""Real and synthetic data for tests and benchmarks (MovieLens-100K, posters, photos)."""
from em3.data.images import render_poster, sample_photos
from em3.data.movielens import MovieLens, click_histories, load_ml100k, ml100k_dir

__all__ = ["MovieLens", "click_histories", "load_ml100k", "ml100k_dir", "render_poster", "sample_photos"]
