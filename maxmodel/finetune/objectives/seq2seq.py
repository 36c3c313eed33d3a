"""Encoder-decoder translation / denoising: the decoder predicts the target, reading the encoded source."""
from .base import Objective, lm_loss

SOURCE_KEYS = ("encoder_inputs", "encoder_segment_ids", "encoder_positions")


def loss(model, batch, settings):
    # segment k of the encoder row is the source of decoder segment k (data/seq2seq.py)
    return lm_loss(model, batch, settings, **{k: batch[k] for k in SOURCE_KEYS})


# (chat records are refused by config/validate.py's seq2seq checks)
OBJECTIVE = Objective("seq2seq", loss, archs=("encoder_decoder",), extra_keys=SOURCE_KEYS)
