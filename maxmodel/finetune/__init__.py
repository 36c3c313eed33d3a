"""Post-training on the pretraining machinery: objectives (one module each), parameter-efficient methods
(peft/), quantization-aware training."""
