"""LoRA adapters in Hugging Face PEFT's format: a directory with `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(transformers_model, DIR)` loads.

PEFT keeps, per adapted torch Linear `<module>` (weight [out, in]), `base_model.model.<module>.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r], and adds scale * B A to the weight; ours are A [*in, r] and
B [r, *out] on weights [*in, *out], flattened the same way the weight conversion flattens heads
(interop/weights.py: [d, heads, head_dim] <-> [heads*head_dim, d]), so A^T and B^T are PEFT's. Module names
come from the same per-layer rules as the weight conversion; a family whose projections are fused (GPT-2's
c_attn holds q, k and v) has no per-target module and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config
from maxmodel.interop import hf_config
from maxmodel.interop.weights import rules_for

from .config import EXPERT_TARGETS, target_names
from .targets import WEIGHTS

PREFIX = "base_model.model."
CONFIG, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _ours(name: str) -> str:
    cls, attr = WEIGHTS[name][:2]
    return f"{'attn' if cls == 'Attention' else 'mlp'}.{attr}"


def hf_modules(cfg: Config) -> dict[str, str]:
    """target name -> the HF module path (with `{i}` for the layer) for this model's family."""
    family = hf_config.guess_family(cfg.model)
    _, layer_rules = rules_for(cfg.model, family)
    by_ours = {r.ours[0]: r.hf[0] for r in layer_rules if len(r.ours) == 1 and len(r.hf) == 1 and r.part is None}
    out = {}
    for name in target_names(cfg.peft.targets):
        if name in EXPERT_TARGETS:
            raise ConfigError("peft.targets", f"{name!r}: expert adapters have no PEFT form here (transformers "
                                              f"holds a MoE layer's experts as fused parameters, not per-expert "
                                              f"Linear modules); export merged weights instead (maxmodel export "
                                              f"--run-dir RUN --out DIR)")
        hf = by_ours.get(_ours(name), "")
        if not hf.endswith(".weight"):
            raise ConfigError("peft.targets", f"{name!r} has no separate Hugging Face module in the {family} "
                                              f"family (fused or missing), so it cannot be a PEFT adapter")
        out[name] = hf[:-len(".weight")]
    return out


def _adapter_arrays(cfg: Config, params: dict, name: str):
    """[(layer, A, B)] of one target from the pure-dict parameter tree (scanned or unrolled stack)."""
    group, attr = _ours(name).split(".")
    layers = params["layers"]
    if cfg.train.scan_layers:
        lora = layers[group][attr + "_lora"]
        a, b = np.asarray(lora["a"]), np.asarray(lora["b"])
        return [(i, a[i], b[i]) for i in range(a.shape[0])]
    return [(int(i), np.asarray(layers[i][group][attr + "_lora"]["a"]), np.asarray(layers[i][group][attr + "_lora"]["b"]))
            for i in sorted(layers, key=int)]


def save_peft(cfg: Config, params: dict, out_dir: Path) -> Path:
    """Write the adapters of `params` (nnx.State as a pure dict, on the host) in PEFT's format."""
    from safetensors.numpy import save_file
    p = cfg.peft
    modules = hf_modules(cfg)
    tensors = {}
    for name, module in modules.items():
        for i, a, b in _adapter_arrays(cfg, params, name):
            key = PREFIX + module.format(i=i)
            tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, p.rank).T.astype(np.float32))
            tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(p.rank, -1).T.astype(np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": p.rank, "lora_alpha": p.alpha,
        "lora_dropout": p.dropout, "use_rslora": p.rslora, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules.values()}), "inference_mode": True,
        "init_lora_weights": True, "base_model_name_or_path": None, "modules_to_save": None}, indent=1))
    return out_dir


def load_peft(cfg: Config, params: dict, directory: Path) -> dict:
    """`params` (pure dict) with its adapters replaced by those of a PEFT directory; a ConfigError (key
    `peft.adapter`) when its rank, scaling or targets differ from peft.*, or a tensor does not fit."""
    from safetensors.numpy import load_file
    directory = Path(directory)
    key = "peft.adapter"
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ConfigError(key, f"{directory} has no {CONFIG} and {WEIGHTS_FILE}")
    conf = json.loads((directory / CONFIG).read_text())
    p = cfg.peft
    if conf.get("peft_type") != "LORA":
        raise ConfigError(key, f"{directory / CONFIG}: peft_type {conf.get('peft_type')!r} is not LORA")
    for field, ours in (("r", p.rank), ("lora_alpha", p.alpha), ("use_rslora", p.rslora)):
        if conf.get(field, False) != ours:
            raise ConfigError(key, f"{directory / CONFIG}: {field}={conf.get(field)} but peft.* says {ours}")
    modules = hf_modules(cfg)
    wanted = {m.rsplit(".", 1)[-1] for m in modules.values()}
    if set(conf.get("target_modules", [])) != wanted:
        raise ConfigError(key, f"{directory / CONFIG}: target_modules {conf.get('target_modules')} but "
                               f"peft.targets gives {sorted(wanted)}")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    layers = params["layers"]
    for name, module in modules.items():
        group, attr = _ours(name).split(".")
        for i, a, b in _adapter_arrays(cfg, params, name):
            k = PREFIX + module.format(i=i)
            if k + ".lora_A.weight" not in tensors:
                raise ConfigError(key, f"{directory / WEIGHTS_FILE} lacks {k}.lora_A.weight")
            new_a = tensors[k + ".lora_A.weight"].T
            new_b = tensors[k + ".lora_B.weight"].T
            if new_a.size != a.size or new_b.size != b.size:
                raise ConfigError(key, f"{k}: lora_A {tensors[k + '.lora_A.weight'].shape} / lora_B "
                                       f"{tensors[k + '.lora_B.weight'].shape} do not fit a weight of shape "
                                       f"{a.shape[:-1]} -> {b.shape[1:]} at rank {p.rank}")
            lora = layers[group][attr + "_lora"] if cfg.train.scan_layers else layers[i][group][attr + "_lora"]
            if cfg.train.scan_layers:
                lora["a"] = np.asarray(lora["a"]).copy() if not isinstance(lora["a"], np.ndarray) else lora["a"]
                lora["b"] = np.asarray(lora["b"]).copy() if not isinstance(lora["b"], np.ndarray) else lora["b"]
                lora["a"][i] = new_a.reshape(a.shape)
                lora["b"][i] = new_b.reshape(b.shape)
            else:
                lora["a"], lora["b"] = new_a.reshape(a.shape), new_b.reshape(b.shape)
    return params
