"""PCA embedding map: projection properties and the drawn image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.rerank.embedding_map import embedding_map, embedding_map_for, pca_2d
from tests.clip_fixtures import blob_images, tiny_clip_dir, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_pca_2d_matches_centred_svd_and_is_sign_stable():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(7, 16)) * np.linspace(3, 0.1, 16)  # [7, 16]
    pca = pca_2d(points)
    assert pca.coords.shape == (7, 2)
    centred = points - points.mean(0)
    _, s, _ = np.linalg.svd(centred)
    np.testing.assert_allclose(np.abs(pca.coords).sum(0) > 0, [True, True])
    np.testing.assert_allclose((pca.coords**2).sum(0), s[:2] ** 2, rtol=1e-9)
    assert pca.explained[0] >= pca.explained[1] > 0 and sum(pca.explained) <= 1 + 1e-9
    np.testing.assert_allclose(pca_2d(-points).coords, -pca.coords)  # same axes: signs fixed by loadings


@pytest.mark.parametrize("n", [1, 2])
def test_pca_2d_degenerate_inputs(n):
    pca = pca_2d(np.arange(n * 4, dtype=float).reshape(n, 4))
    assert pca.coords.shape == (n, 2)
    assert np.all(pca.coords[:, 1] == 0)
    assert pca.explained[1] == 0.0
    assert np.all(np.isfinite(pca.coords))


def test_embedding_map_size_and_degenerate_single_pair():
    thumbs = blob_images([(64, 64)])
    image = embedding_map(torch.ones(1, 8), torch.zeros(1, 8) + 0.5, ["a cat"], images=thumbs)
    assert image.size == (640, 480) and image.mode == "RGB"
    tiny = embedding_map(torch.randn(1, 8), torch.randn(1, 8), ["only text"], size=(320, 240))
    assert tiny.size == (320, 240)


def test_embedding_map_checks_lengths():
    with pytest.raises(ValueError, match="texts has 1 entries for 2"):
        embedding_map(np.ones((3, 4)), np.ones((2, 4)), ["one"])
    with pytest.raises(ValueError, match="images has 1 entries for 3"):
        embedding_map(np.ones((3, 4)), np.ones((1, 4)), ["one"], images=blob_images([(8, 8)]))


def test_embedding_map_for_scorer(tmp_path):
    from pipelines.rerank.clip_scorer import ClipScorer

    scorer = ClipScorer.load(tiny_clip_dir(tmp_path), device="cpu")
    images = blob_images([(64, 64), (80, 60), (96, 96)])
    picture = embedding_map_for(scorer, images, ["a red circle", "a blue square"], size=(480, 360))
    assert picture.size == (480, 360)
    pixels = np.asarray(picture)
    assert pixels.std() > 10  # something was drawn
