"""Geometry helpers: exact distances under float32 cancellation, PCA, spectra, pooling and the size cap."""
import numpy as np
import pytest
import torch

from kdutils import geometry


def test_min_distance_is_exact_despite_float32_cancellation():
    # a large common offset: |f|^2 ~ 1e8 while distances^2 ~ 1e-2, far below float32 resolution of the Gram
    rng = np.random.default_rng(0)
    dim, per = 64, 30
    base = rng.uniform(900, 1100, size=dim)
    x = np.concatenate([base + rng.normal(scale=0.05, size=(per, dim)) + shift
                        for shift in (0.0, 0.02, -0.02)]).astype(np.float32)
    codes = np.repeat(np.arange(3), per)
    stats = geometry.gram_statistics(torch.from_numpy(x), torch.from_numpy(codes), 3)
    x64 = x.astype(np.float64)
    for c in range(3):
        a, b = x64[codes == c], x64[codes != c]
        want = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min()
        assert stats["min_inter_dist"][c] == pytest.approx(want, rel=1e-9)
    # the naive float32 Gram formula is badly wrong here, which is why candidates are recomputed
    g = torch.from_numpy(x) @ torch.from_numpy(x).T
    sq = torch.diag(g)
    naive = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0).sqrt()[codes == 0][:, codes != 0].min().item()
    assert abs(naive - stats["min_inter_dist"][0]) > 0.01 * stats["min_inter_dist"][0]
    assert (stats["candidates"] >= 1).all()


def test_pca_2d_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(300, 40)) * np.linspace(5, 0.1, 40)).astype(np.float32) + 3.0
    coords = geometry.pca_2d(torch.from_numpy(x) @ torch.from_numpy(x).T, seed=0)
    want = PCA(2).fit_transform(x.astype(np.float64))
    for k in range(2):
        np.testing.assert_allclose(np.abs(coords[:, k]), np.abs(want[:, k]), rtol=0, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(coords, geometry.pca_2d(torch.from_numpy(x) @ torch.from_numpy(x).T, seed=0))


def test_class_spectrum_uses_the_smaller_gram_and_matches_svd():
    rng = np.random.default_rng(2)
    for n, d in ((50, 8), (20, 200)):
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 2, size=d)
        got = geometry.class_spectrum(torch.from_numpy(x))
        s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
        want = (s / s.sum())[:min(n - 1, d)]
        assert len(got) == min(n - 1, d)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-14)
    assert geometry.class_spectrum(torch.ones(5, 3)).sum() == 0


def test_pooling_and_size_cap():
    conv = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    assert geometry.pool_features(conv).shape == (2, 4)
    assert torch.equal(geometry.pool_features(conv)[0], conv[0].mean(dim=(1, 2)))
    tokens = torch.randn(2, 5, 6)
    assert torch.allclose(geometry.pool_features(tokens), tokens.mean(1))
    big = torch.randn(2, 4, 8, 8)                       # 256 values per sample
    assert geometry.flatten_features(big, max_dim=64).shape == (2, 64)      # 2x2 max-pool: 4 x 4 x 4
    assert torch.equal(geometry.flatten_features(big, max_dim=64)[0, 0], big[0, 0, :2, :2].max())
    assert geometry.flatten_features(big, max_dim=None).shape == (2, 256)
    assert geometry.flatten_features(torch.ones(2, 3, dtype=torch.int64)).dtype == torch.float32


def test_linear_probe_separable_and_chance():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 5)) + 4 * np.eye(3, 5)[y]
    assert geometry.linear_probe(x[::2], y[::2], x[1::2], y[1::2]) > 0.9
    assert geometry.linear_probe(rng.normal(size=(120, 5))[::2], y[::2], rng.normal(size=(60, 5)), y[1::2]) < 0.6


def test_gram_statistics_in_row_chunks_match_dense_float64():
    # 3 classes of 500 samples: gram_statistics walks each class in chunks of 2**19 // 1500 = 349 rows, so this
    # checks that per-chunk sums, minima and the distance candidates combine to the dense, one-shot answer
    rng = np.random.default_rng(5)
    per, dim = 500, 20
    x = np.concatenate([rng.normal(size=dim) * 2 + rng.normal(size=(per, dim)) for _ in range(3)]).astype(np.float32)
    codes = rng.permutation(np.repeat(np.arange(3), per))
    assert per > geometry._GRAM_ROW_ELEMS // len(x)
    stats = geometry.gram_statistics(torch.from_numpy(x), torch.from_numpy(codes), 3)
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=1)
    cos = np.abs(x64 @ x64.T) / np.outer(norms, norms)
    dist = np.sqrt(((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1))
    for c in range(3):
        inside, outside = codes == c, codes != c
        pairs = cos[np.ix_(inside, inside)][np.triu_indices(per, k=1)]
        np.testing.assert_allclose(stats["avg_intra"][c], pairs.mean(), rtol=1e-6)
        np.testing.assert_allclose(stats["min_intra"][c], pairs.min(), rtol=1e-5, atol=1e-6)  # float32 Gram
        np.testing.assert_allclose(stats["norm"][c], norms[inside].mean(), rtol=1e-6)
        assert stats["min_inter_dist"][c] == pytest.approx(dist[np.ix_(inside, outside)].min(), rel=1e-9)
        for o in range(3):
            want = np.nan if o == c else cos[np.ix_(inside, codes == o)].mean()
            np.testing.assert_allclose(stats["avg_inter"][c, o], want, rtol=1e-6)


def test_one_torch_thread_limits_and_restores_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with geometry.one_torch_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
