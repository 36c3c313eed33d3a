"""The model class for a config's `model.arch`: the one place that maps an architecture to its module."""
from __future__ import annotations

from flax import nnx

from maxmodel.config.schema import Config


def model_class(cfg: Config) -> type[nnx.Module]:
    from .encoder import Encoder
    from .encoder_decoder import EncoderDecoder
    from .transformer import Transformer
    classes = {"decoder": Transformer, "encoder": Encoder, "encoder_decoder": EncoderDecoder}
    return classes[cfg.model.arch]


def build_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    """A new model for `cfg` (call under nnx.eval_shape for shapes only)."""
    model = model_class(cfg)(cfg, rngs)
    if cfg.model.score_head:  # a scalar head beside the LM head (reward models): score_head.py
        from .score_head import attach_score_head
        model = attach_score_head(model, cfg)
    if cfg.peft.method != "none":  # adapters (and a quantized base) on top: maxmodel/finetune/peft
        from maxmodel.finetune.peft import attach
        model = attach(model, cfg, rngs)
    if cfg.train.qat != "none":  # fake-quantized projection weights in the forward pass
        from maxmodel.finetune.qat import attach_qat
        model = attach_qat(model, cfg)
    return model
