import torch

from em3.model.fusion import FusionQFormer, MeanFusion, pooled_tokens


def _inputs(n=3, tt=5, ti=4, ht=12, hi=10):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(n, tt, ht, generator=g)
    image = torch.randn(n, ti, hi, generator=g)
    tmask = torch.ones(n, tt, dtype=torch.bool)
    tmask[1, 3:] = False
    imask = torch.ones(n, ti, dtype=torch.bool)
    return text, image, tmask, imask


def test_qformer_shapes_and_query_outputs():
    f = FusionQFormer([12, 10], d=8, query_num=4, layers=2, heads=2).eval()
    text, image, tmask, imask = _inputs()
    assert f([text, image], [tmask, imask]).shape == (3, 8)
    assert f.query_outputs([text, image], [tmask, imask]).shape == (3, 4, 8)


def test_missing_modality_and_padding_are_masked():
    for f in (FusionQFormer([12, 10], 8, 4, 1, 2).eval(), MeanFusion([12, 10], 8).eval(),
              FusionQFormer([12, 10], 8, 4, 1, 2, pooled_skip=True).eval()):
        text, image, tmask, imask = _inputs()
        imask[0] = False  # item 0 has no image
        out = f([text, image], [tmask, imask])
        image2, text2 = image.clone(), text.clone()
        image2[0] = 1e3  # garbage where the image is missing
        text2[1, 3:] = -1e3  # garbage in text padding
        out2 = f([text2, image2], [tmask, imask])
        torch.testing.assert_close(out, out2)
        # The image does matter when present.
        assert not torch.allclose(out[2], f([text, image2 * 0 + 5], [tmask, imask])[2])


def test_item_with_no_modality_gets_a_finite_embedding():
    f = FusionQFormer([12, 10], 8, 2, 1, 2).eval()
    text, image, tmask, imask = _inputs()
    tmask[:] = False
    imask[:] = False
    out = f([text, image], [tmask, imask])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], out[1])  # all equal to the learned null embedding


def test_gradients_reach_queries_and_projections():
    f = FusionQFormer([12, 10], 8, 4, 1, 2)
    text, image, tmask, imask = _inputs()
    f([text, image], [tmask, imask]).pow(2).sum().backward()
    assert f.queries.grad is not None and f.queries.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in f.tokens.proj.parameters())


def test_pooled_tokens_is_the_masked_mean_per_modality():
    text, image, tmask, imask = _inputs()
    imask[0] = False  # item 0 has no image: its image part is zeros
    pooled = pooled_tokens([text, image], [tmask, imask])
    assert pooled.shape == (3, 12 + 10)
    torch.testing.assert_close(pooled[1, :12], text[1, :3].mean(0))  # padding left out
    torch.testing.assert_close(pooled[2, 12:], image[2].mean(0))
    assert (pooled[0, 12:] == 0).all()


def test_pooled_skip_starts_as_the_encoders_summary_and_the_queries_learn_to_add():
    f = FusionQFormer([12, 10], 8, 4, 1, 2, pooled_skip=True)
    text, image, tmask, imask = _inputs()
    out = f([text, image], [tmask, imask])
    # At the start the queries' part is zero: the embedding is the pooled summary's map.
    torch.testing.assert_close(out, f.pooled(pooled_tokens([text, image], [tmask, imask])))
    out.pow(2).sum().backward()
    assert f.out.weight.grad.abs().sum() > 0  # the queries' projection learns first
    with torch.no_grad():
        f.out.weight.normal_()
    f.zero_grad()
    f([text, image], [tmask, imask]).pow(2).sum().backward()
    assert f.queries.grad.abs().sum() > 0  # then the queries


def test_modality_share_apportions_the_pooled_part_and_sums_to_one():
    f = FusionQFormer([12, 10], 8, 4, 1, 2, pooled_skip=True).eval()
    text, image, tmask, imask = _inputs()
    imask[0] = False  # item 0 has no image
    share = f.modality_share([text, image], [tmask, imask])
    torch.testing.assert_close(share.sum(1), torch.ones(3))
    assert (share >= 0).all()
    # At the start the queries add nothing: the share is the pooled terms' norms alone.
    x = f.pooled[0](pooled_tokens([text, image], [tmask, imask]))
    w = f.pooled[1].weight
    t, i = (x[:, :12] @ w[:, :12].T).norm(dim=-1), (x[:, 12:] @ w[:, 12:].T).norm(dim=-1)
    torch.testing.assert_close(share[1:, 1], t[1:] / (t[1:] + i[1:]))
    assert share[0, 2] == 0.0  # no image: no share on it; its empty slot's term counts as missing
    torch.testing.assert_close(share[0, 0], i[0] / (t[0] + i[0]))
    # Without the skip the share is the attention mass.
    plain = FusionQFormer([12, 10], 8, 4, 1, 2).eval()
    torch.testing.assert_close(plain.modality_share([text, image], [tmask, imask]),
                               plain.attention_mass([text, image], [tmask, imask]))
