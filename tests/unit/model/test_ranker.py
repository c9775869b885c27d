import torch

from em3.model.ranker import HashEmbedding, TargetAttention, stable_bucket


def test_stable_bucket_is_deterministic_and_salted():
    assert stable_bucket("42", "item", 1 << 15) == stable_bucket("42", "item", 1 << 15)
    assert 0 <= stable_bucket("never seen before", "user", 10) < 10
    hits = {stable_bucket(str(i), "item", 1 << 15) for i in range(1000)}
    assert len(hits) > 970  # few collisions


def test_hash_embedding_takes_unseen_ids_and_bags_contexts():
    emb = HashEmbedding(64, 4, "ctx")
    assert emb(["a", "totally-new-id", ""]).shape == (3, 4)
    bag = emb.bag([{}, {"device": "ios"}, {"device": "ios", "country": "fr"}])
    assert bag.shape == (3, 4)
    torch.testing.assert_close(bag[0], torch.zeros(4))
    torch.testing.assert_close(bag[2], emb(["country=fr"])[0] + emb(["device=ios"])[0])


def _reference_din(att, w, bias, target, history, mask):
    """DIN with the explicit [h, t, h - t, h * t] concatenation."""
    t = target.unsqueeze(1).expand_as(history)
    x = torch.cat([history, t, history - t, history * t], dim=-1)
    pre = x @ w.T + bias
    logits = att.score(att.act(pre.transpose(1, 2)).transpose(1, 2)).squeeze(-1)
    logits = logits.masked_fill(~mask, float("-inf"))
    wts = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)
    return (wts.unsqueeze(-1) * history).sum(1)


def test_decomposed_attention_equals_explicit_concatenation():
    torch.manual_seed(3)
    r, h = 6, 5
    att = TargetAttention(r, h).double()
    w1, w2, w3, w4 = (torch.randn(h, r, dtype=torch.float64) for _ in range(4))
    with torch.no_grad():
        att.a.weight.copy_(w1 + w3)
        att.b.weight.copy_(w2 - w3)
        att.c.weight.copy_(w4)
    target = torch.randn(3, r, dtype=torch.float64)
    history = torch.randn(3, 7, r, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False  # empty history
    got = att(target, history, att.project_history(history), mask)
    ref = _reference_din(att, torch.cat([w1, w2, w3, w4], 1), att.a.bias, target, history, mask)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got[2], torch.zeros(r, dtype=torch.float64))


def test_masked_history_is_ignored_and_long_sequences_run():
    att = TargetAttention(8, 4)
    target = torch.randn(2, 8)
    history = torch.randn(2, 1000, 8)
    mask = torch.ones(2, 1000, dtype=torch.bool)
    mask[:, 500:] = False
    out = att(target, history, att.project_history(history), mask)
    history2 = history.clone()
    history2[:, 500:] = 99.0
    torch.testing.assert_close(out, att(target, history2, att.project_history(history2), mask))
    assert out.shape == (2, 8) and torch.isfinite(out).all()


def test_attention_gradients_match_finite_differences():
    torch.manual_seed(0)
    att = TargetAttention(3, 2).double()
    mask = torch.tensor([[True, True, False], [True, True, True]])

    def f(target, history):
        return att(target, history, att.project_history(history), mask)

    target = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    history = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (target, history))


def test_content_fade_silences_a_warm_targets_content_in_the_deep_part_only():
    from em3.model.ranker import ClickHead

    torch.manual_seed(0)
    d, c = 4, 4  # item reps: [content (c) ; ID (d)]
    user, ctx = torch.randn(2, d), torch.randn(2, d)
    interest = torch.randn(2, c + d)
    target = torch.randn(2, c + d)
    other = torch.cat([torch.randn(2, c), target[:, c:]], dim=-1)  # same ID part, other content
    no_history = torch.zeros(2, dtype=torch.bool)  # no match term: only the MLP and the FM term read content

    def logits(fade: bool, gate: float, t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        head = ClickHead(d, c + d, (8,), content_dim=c, fade_content=fade)
        return head(user, ctx, t, interest, torch.full((2,), gate), no_history)

    # A warm target (gate 0): with the fade its content no longer moves the logit.
    torch.testing.assert_close(logits(True, 0.0, target), logits(True, 0.0, other))
    assert not torch.allclose(logits(False, 0.0, target), logits(False, 0.0, other))
    # A new item (gate 1) is read as without the fade.
    torch.testing.assert_close(logits(True, 1.0, target), logits(False, 1.0, target))
