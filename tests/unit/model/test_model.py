import math

import msgspec

import pytest
import torch

from em3.data.images import sample_photos
from em3.model import EM3Model, ModelConfig
from em3.types import ItemContent


@pytest.fixture(scope="module")
def model(tiny_config):
    return EM3Model(tiny_config).eval()


def _batch(model, items, users=("u1", "u2", "u3")):
    ids = [it.item_id for it in items]
    enc = model.encode_items(ids, items)
    target = torch.tensor([0, 1, 2])
    hist = torch.tensor([[3, 4, 5], [5, 0, 0], [0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    ctx = [{"device": "ios"}, {}, {"device": "web"}]
    return enc, model(list(users), ctx, enc.reps, target, hist, mask)


def test_shapes(model, items, tiny_config):
    enc, logits = _batch(model, items)
    d = tiny_config.embed_dim
    # [content ; id ; cold-start gate ; item wide logit ; item CVR logit part ; log expected value]
    assert enc.reps.shape == (6, 2 * d + 4) == (6, tiny_config.rep_dim) and enc.content.shape == (6, d) and enc.ids.shape == (6, d)
    assert logits.shape == (3,) and torch.isfinite(logits).all()


def test_content_match_gate_fades_with_trained_impressions(items, tiny_config):
    model = EM3Model(tiny_config.replace(content_match_impressions=4.0)).eval()
    ids = [i.item_id for i in items]
    with torch.no_grad():
        fresh = model.item_representations(ids, items)[:, tiny_config.item_dim]
        torch.testing.assert_close(fresh, torch.ones(len(ids)))
        model.observe_impressions([ids[0]] * 4 + [ids[1]] * 12)
        gate = model.item_representations(ids, items)[:, tiny_config.item_dim]
    assert gate[0].item() == pytest.approx(0.5) and gate[1].item() == pytest.approx(0.25)
    torch.testing.assert_close(gate[2:], torch.ones(len(ids) - 2))
    # The counter and the running content mean are learned state: they travel with
    # the snapshot tensors.
    model.head.observe_content(torch.ones(3, tiny_config.embed_dim), momentum=0.5)
    torch.testing.assert_close(model.head.content_mean, torch.full((tiny_config.embed_dim,), 0.5))
    other = EM3Model(tiny_config.replace(content_match_impressions=4.0))
    other.load_trainable_state_dict(model.trainable_state_dict())
    torch.testing.assert_close(other.item_impressions, model.item_impressions)
    torch.testing.assert_close(other.head.content_mean, model.head.content_mean)


def test_content_match_term_scores_a_new_item_by_its_content(items, tiny_config):
    """With every ID row silent, the gated term still separates candidates by how well
    their content matches the history; with the term disabled it does not exist."""
    on = EM3Model(tiny_config).eval()
    off = EM3Model(tiny_config.replace(content_match_impressions=0.0)).eval()
    assert on.head.content_match is not None and off.head.content_match is None
    assert "item_impressions" not in EM3Model(tiny_config.replace(content_match_impressions=0.0,
                                                                  stat_features=False)).trainable_state_dict()
    ids = [i.item_id for i in items]
    with torch.no_grad():
        reps = on.item_representations(ids, items)
        with_term = on.score_candidates("u", {}, reps[:2], reps)
        no_history = on.score_candidates("u", {}, reps[:0], reps)
        on.head.content_match.zero_()
        without = on.score_candidates("u", {}, reps[:2], reps)
        # Without a history there is nothing to match: w plays no part.
        torch.testing.assert_close(on.score_candidates("u", {}, reps[:0], reps), no_history)
    assert not torch.allclose(with_term, without)


def test_unseen_ids_and_missing_content(model, items):
    odd = [ItemContent("brand-new-item", text="", image=None), None,
           ItemContent("x", text="only text"), ItemContent("y", image=items[0].image),
           ItemContent("z", text="bad image", image=b"not an image")]
    enc = model.encode_items(["brand-new-item", "unknown", "x", "y", "z"], odd)
    assert torch.isfinite(enc.reps).all()
    torch.testing.assert_close(enc.content[0], enc.content[1])  # both fully missing: the null embedding
    with torch.no_grad():
        logits = model.score_candidates("never-seen-user", {"new": "ctx"}, enc.reps[:0], enc.reps)
    assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_item_representation_is_batch_independent(model, items):
    with torch.no_grad():
        together = model.item_representations([i.item_id for i in items], items)
        alone = torch.cat([model.item_representations([i.item_id], [i]) for i in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_score_candidates_equals_forward(model, items):
    with torch.no_grad():
        reps = model.item_representations([i.item_id for i in items], items)
        hist = torch.tensor([[3, 4, 5]] * 3)
        mask = torch.ones(3, 3, dtype=torch.bool)
        fwd = model(["u"] * 3, [{"k": "v"}] * 3, reps, torch.tensor([0, 1, 2]), hist, mask)
        cand = model.score_candidates("u", {"k": "v"}, reps[3:6], reps[0:3])
    torch.testing.assert_close(fwd, cand)


def test_base_frozen_lora_trainable_and_ranking_loss_reaches_them(items, tiny_config):
    model = EM3Model(tiny_config.replace(cic_weight=0.0))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("text" in n and "lora_" in n for n in names)
    assert any("image" in n and "lora_" in n for n in names)
    for n, p in model.named_parameters():
        if n.startswith(("text.", "image.")):
            assert p.requires_grad == ("lora_" in n), n
    _, logits = _batch(model, items)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0, 1.0])).backward()
    # LoRA B starts at zero, so A gets no gradient on the first step; B must.
    for prefix in ("text.", "image."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix
    # The queries' projection starts at zero (pooled skip), so, as LoRA's A, the
    # queries get no gradient on the first step; the projection and the pooled path must.
    assert model.fusion.out.weight.grad.abs().sum() > 0
    assert model.fusion.pooled[1].weight.grad.abs().sum() > 0
    assert model.item_emb.table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant,encoder_trainable", [("content_frozen", False), ("full_finetune", True),
                                                         ("no_fusion", None), ("id_only", None)])
def test_variants_build_and_train(variant, encoder_trainable, items):
    model = EM3Model(ModelConfig.tiny(variant))
    enc, logits = _batch(model, items)
    (logits.sum() + model.cic_loss(enc)).backward()
    enc_params = [p for n, p in model.named_parameters() if n.startswith(("text.", "image."))]
    if encoder_trainable is True:
        assert all(p.requires_grad for p in enc_params)
    elif encoder_trainable is False:
        assert enc_params and not any(p.requires_grad for p in enc_params)
    if variant == "id_only":
        assert model.text is None and model.image is None and enc.reps.shape[1] == 16 + 1 + 2  # [id ; wide logit ; CVR columns]
    if variant == "no_fusion":
        assert type(model.fusion).__name__ == "MeanFusion"


def test_prefix_cache_hits_and_invalidates_on_new_content(items, tiny_config):
    model = EM3Model(tiny_config, cache_items=4).eval()
    ids = [i.item_id for i in items]
    with torch.no_grad():
        first = model.item_representations(ids[:3], items[:3])
        misses = model.cache.misses
        again = model.item_representations(ids[:3], items[:3])
        assert model.cache.misses == misses and model.cache.hits >= 3
        torch.testing.assert_close(first, again)
        changed = msgspec.structs.replace(items[0], text="A completely different film")
        third = model.item_representations([ids[0]], [changed])
    assert model.cache.misses == misses + 1
    assert not torch.allclose(third[0], first[0])
    model.item_representations(ids, items)
    assert len(model.cache) == 4  # bounded


def test_real_photographs_go_through_the_image_path(tiny_config):
    photos = sample_photos(size=64)
    model = EM3Model(tiny_config).eval()
    with_img = [ItemContent(f"p{k}", text="a photo", image=b) for k, b in enumerate(photos)]
    without = [ItemContent(f"p{k}", text="a photo") for k in range(len(photos))]
    with torch.no_grad():
        a = model.encode_items([c.item_id for c in with_img], with_img).content
        b = model.encode_items([c.item_id + "-noimg" for c in without], without).content
    assert torch.isfinite(a).all()
    assert not torch.allclose(a[0], a[1])  # two different photos, two different embeddings
    assert not torch.allclose(a[0], b[0])


def test_long_history_of_1000(items, tiny_config):
    model = EM3Model(tiny_config.replace(history_len=1000))
    ids = [f"h{k}" for k in range(1000)]
    contents = [ItemContent(i, text=f"item {i}") for i in ids]
    enc = model.encode_items(ids, contents)
    hist = torch.arange(1000).repeat(4, 1)
    logits = model(["a", "b", "c", "d"], [{}] * 4, enc.reps, torch.tensor([0, 1, 2, 3]), hist,
                   torch.ones(4, 1000, dtype=torch.bool))
    logits.sum().backward()
    assert logits.shape == (4,) and torch.isfinite(logits).all()


def test_hf_vision_model_by_config(tmp_path, items):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32), add_pooling_layer=False).save_pretrained(tmp_path)
    cfg = ModelConfig.tiny(image_model=str(tmp_path), image_lora_targets=("query", "value", "q_proj", "v_proj"))
    model = EM3Model(cfg)
    assert any("lora_" in n for n, p in model.image.named_parameters() if p.requires_grad)
    enc = model.encode_items([i.item_id for i in items], items)
    assert enc.reps.shape == (6, cfg.rep_dim) and torch.isfinite(enc.reps).all()


def test_trainable_state_roundtrip(items, tiny_config):
    a, b = EM3Model(tiny_config).eval(), EM3Model(tiny_config.replace(seed=1)).eval()
    state = a.trainable_state_dict()
    counters = {"item_impressions", "item_clicks", "user_impressions", "user_clicks", "global_counts",
                "head.content_mean", "cvr_item_counts", "cvr_user_counts", "cvr_global_counts"}
    assert set(state) - {n for n, p in a.named_parameters() if p.requires_grad} == counters
    assert sum(v.numel() for k, v in state.items() if k not in counters) == a.num_trainable_params()
    b.load_trainable_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(a.item_representations(["i0"], items[:1])[:, 16:],
                                   b.item_representations(["i0"], items[:1])[:, 16:])
    with pytest.raises(ValueError, match="does not fit"):
        b.load_trainable_state_dict({"nope": torch.zeros(1)})


def test_click_statistics_count_learned_samples_and_move_the_logit(items, tiny_config):
    """Items and users with more clicks per impression score higher; a late click adds
    a click, not an impression; the counters travel in the trainable state. (The
    popularity term is off here: it has its own test below.)"""
    model = EM3Model(tiny_config.replace(content_match_impressions=0.0, popularity_weight_init=0.0)).eval()
    ids = [i.item_id for i in items]
    with torch.no_grad():
        before = model.item_representations(ids, items)
        model.observe_impressions(["i0"] * 10 + ["i1"] * 10, ["u1"] * 10 + ["u2"] * 10, [1] * 9 + [0] + [0] * 10)
        model.observe_late_clicks(["i1"], ["u2"])
        after = model.item_representations(ids, items)
        wide = tiny_config.item_dim  # the item's wide-logit column
        assert after[0, wide] > before[0, wide] == 0.0 > after[1, wide]
        assert after[2, wide] == 0.0  # an item never seen sits at the global rate
        assert model.global_counts.tolist() == [20.0, 10.0] and model.item_clicks[model.item_emb.buckets_of(["i1"])] == 1
        assert model.user_stat(["u1"]) > 0 > model.user_stat(["u2"]) and model.user_stat(["new"]) == 0
    state = model.trainable_state_dict()
    assert state["user_impressions"].sum() == 20 and state["item_clicks"].sum() == 10
    off = EM3Model(tiny_config.replace(stat_features=False, content_match_impressions=0.0, ctcvr_weight=0.0))
    assert "item_clicks" not in off.trainable_state_dict() and off.config.rep_dim == tiny_config.item_dim


def test_item_popularity_ranks_often_shown_items_above_rarely_shown_ones(items, tiny_config):
    """With the popularity term on, an item shown more often than the mean gets a
    higher wide logit than one shown less (click rates equal), a new item sits below
    both, and the term's weight travels in the trainable state; 0 leaves it out."""
    cfg = tiny_config.replace(content_match_impressions=0.0, popularity_weight_init=0.4, user_stat_weight_init=0.5)
    model = EM3Model(cfg).eval()
    ids = [i.item_id for i in items]
    with torch.no_grad():
        # i0: 30 impressions, i1: 3; both click at the rate 1/3, the global rate.
        model.observe_impressions(["i0"] * 30 + ["i1"] * 3, ["u"] * 33, [1, 0, 0] * 11)
        reps = model.item_representations(ids, items)
        wide = cfg.item_dim
        assert reps[0, wide] > 0 > reps[1, wide] > reps[2, wide]
        mean = 33 / 2
        expected = 0.4 * (math.log1p(30) - math.log1p(mean))
        assert reps[0, wide].item() == pytest.approx(expected + float(model.item_stat(model.item_emb.buckets_of(["i0"]))), abs=1e-5)
    state = model.trainable_state_dict()
    assert state["popularity_weight"].item() == pytest.approx(0.4)
    assert state["stat_weights"].tolist() == pytest.approx([1.0, 0.5])
    for off in (tiny_config.replace(popularity_weight_init=0.0), tiny_config.replace(stat_features=False)):
        assert "popularity_weight" not in EM3Model(off).trainable_state_dict()


def _bounded(tiny_config, **kw):
    return tiny_config.replace(id_table="bounded", id_fallback_buckets=2, content_match_impressions=4.0, **kw)


def test_bounded_tables_a_new_item_on_a_busy_fallback_row_is_cold(items, tiny_config):
    """Issue 14: with hashed rows, a new item sharing a bucket with a popular one looks
    warm. With bounded tables the popular item owns a row (its counters are its own) and
    an item without one is cold whatever its fallback row has counted."""
    model = EM3Model(_bounded(tiny_config, id_admit_after=3)).eval()
    ids = [i.item_id for i in items]
    t = 1.75e9
    with torch.no_grad():
        for step in range(4):  # i0: 3 impressions before a row, then 1 on it; i1: 2, never admitted
            batch = [ids[0]] + ([ids[1]] if step < 2 else [])
            model.observe_ids(batch, ["u"] * len(batch), now=t + step)
            model.observe_impressions(batch, ["u"] * len(batch), [1.0] * len(batch))
        rows = model.item_emb.buckets_of(ids).tolist()
        assert rows[0] >= 2 and all(r < 2 for r in rows[1:])
        assert model.item_impressions[rows[0]].item() == 4.0  # 2 from the sketch + 2 on its row
        assert model.item_clicks[rows[0]].item() == 4.0
        gate = model.item_representations(ids, items)[:, tiny_config.item_dim]
    assert gate[0].item() == pytest.approx(0.5)
    torch.testing.assert_close(gate[1:], torch.ones(len(ids) - 1))  # fallback rows count as cold
    # The map travels with the trainable state.
    other = EM3Model(_bounded(tiny_config, id_admit_after=3))
    other.load_trainable_state_dict(model.trainable_state_dict())
    assert other.item_emb.buckets_of(ids).tolist() == rows


def test_bounded_tables_an_admitted_row_starts_from_its_fallback_row(tiny_config):
    model = EM3Model(_bounded(tiny_config, id_admit_after=1))
    before = model.item_emb.buckets_of(["x"]).item()
    with torch.no_grad():
        model.item_emb.table.weight[before] = 3.0
        reset = model.observe_ids(["x"], ["u"], now=1.75e9)
    row = model.item_emb.buckets_of(["x"]).item()
    assert row >= 2 and reset["item_emb.table.weight"] == [row] and reset["user_emb.table.weight"]
    torch.testing.assert_close(model.item_emb.table.weight[row], torch.full((tiny_config.embed_dim,), 3.0))
    assert model.item_impressions[row].item() == 0.0  # its first impression is counted after the step
