import json

import pytest

from em3.model import VARIANTS, ModelConfig


def test_defaults_follow_the_paper_and_roundtrip():
    cfg = ModelConfig()
    assert (cfg.embed_dim, cfg.query_num, cfg.history_len) == (64, 4, 100)
    # Chosen on the tuning window (docs/results.md): CIC off, statistics on, biases off.
    assert (cfg.cic_weight, cfg.stat_features, cfg.bias_terms) == (0.0, True, False)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("field,value,message", [
    ("query_num", -3, "query_num must be > 0, but -3 is given"),
    ("embed_dim", 0, "embed_dim must be > 0, but 0 is given"),
    ("cic_temperature", 0.0, "cic_temperature must be > 0, but 0.0 is given"),
    ("encoder_mode", "half", "encoder_mode must be one of"),
    ("fusion", "concat", "fusion must be one of"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
])
def test_invalid_values_say_what_was_expected(field, value, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{field: value})
    assert message in str(err.value)


def test_unknown_keys_and_variants_are_refused():
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"embed_dim": 8, "colour": "red"})
    with pytest.raises(ValueError, match="variant must be one of"):
        ModelConfig.for_variant("em4")


def test_variants():
    assert set(VARIANTS) == {"em3", "id_only", "content_frozen", "no_cic", "no_fusion", "full_finetune", "text_only",
                             "image_only"}
    assert not ModelConfig.for_variant("id_only").use_content
    assert ModelConfig.for_variant("id_only").item_dim == 64
    assert ModelConfig.for_variant("em3").item_dim == 128
    assert ModelConfig.for_variant("no_cic").cic_weight == 0
    assert ModelConfig.for_variant("content_frozen").encoder_mode == "frozen"
    assert ModelConfig.for_variant("no_fusion").fusion == "mean"
    assert ModelConfig.for_variant("full_finetune").encoder_mode == "full"
    assert ModelConfig.tiny("no_cic").variant == "no_cic"
    # The small test configs keep what each variant removes.
    assert not ModelConfig.tiny("text_only").has_image and ModelConfig.tiny("text_only").has_text
    assert not ModelConfig.tiny("image_only").has_text and ModelConfig.tiny("image_only").has_image
    assert ModelConfig.tiny("em3").has_text and ModelConfig.tiny("em3").has_image


def test_a_config_saved_before_a_field_existed_rebuilds_the_model_it_was_saved_from():
    from em3.model import EM3Model
    from em3.model.config import LEGACY_DEFAULTS

    old = ModelConfig.tiny("em3", **LEGACY_DEFAULTS).to_dict()
    state = EM3Model(ModelConfig.from_dict(old)).state_dict()
    for name in LEGACY_DEFAULTS:
        del old[name]  # what a snapshot published before these fields carries
    config = ModelConfig.from_dict(old)
    assert (config.fusion_pooled_skip, config.content_fade, config.ctcvr_weight) == (False, False, 0.0)
    EM3Model(config).load_state_dict(state)  # strict: the same tensors, none missing
    # A config that names a field keeps its value, and today's defaults are unchanged.
    assert ModelConfig.from_dict(ModelConfig.tiny("em3").to_dict()).fusion_pooled_skip is True
    assert ModelConfig().fusion_pooled_skip and ModelConfig().content_fade
