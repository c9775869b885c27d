"""The EM3 model (arXiv 2404.06078) in pure torch: LoRA content encoders, the
Fusion-Q-Former, a hashed-ID DIN ranker and the Content-ID contrastive loss."""
from em3.model.config import VARIANTS, ModelConfig
from em3.model.losses import content_id_infonce, weighted_bce
from em3.model.model import USER_ROW_STATE, EM3Model, ItemEncoding, reset_user_rows, user_rows, user_rows_in

__all__ = ["ModelConfig", "VARIANTS", "EM3Model", "ItemEncoding", "content_id_infonce", "weighted_bce",
           "USER_ROW_STATE", "user_rows", "user_rows_in", "reset_user_rows"]
