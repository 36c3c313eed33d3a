"""`maxmodel export --step N --out DIR [--dtype bfloat16] [--format model|peft] [--run-dir RUN | CONFIG.yaml ...]`

Writes a checkpoint's parameters alone (no optimizer state), optionally cast, for fine-tuning and inference.
A run with adapters (peft.method=lora) exports its merged weights (adapters folded in: a plain model
directory, which `maxmodel convert to-hf` turns into a transformers model); `--format peft` writes the
adapters alone in Hugging Face PEFT's format (adapter_config.json + adapter_model.safetensors).
`maxmodel train ... init.from=DIR` starts a new run from them: fresh optimizer, step 0.
DIR holds `params/` (an orbax checkpoint of the parameter tree) and `export.json` (where it came from).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import yaml

from maxmodel import jsonio
from maxmodel.config import ConfigError, load_config_args
from maxmodel.config.loader import config_from_dict

log = logging.getLogger("maxmodel.export")

DTYPES = ("float32", "bfloat16", "float16")


def _params_dir(directory) -> Path:
    return Path(directory).absolute() / "params"


def load_params(directory: str, target):
    """Exported parameters restored onto `target` (ShapeDtypeStructs with this run's shardings and dtypes;
    orbax casts an exported bf16 tree to the run's param dtype)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from maxmodel.models.score_head import split_head, zero_head_like
    if not (Path(directory) / "export.json").is_file():
        raise ConfigError("init.from", f"{directory} is not a `maxmodel export` directory (no export.json)")
    head, rest = split_head(target)
    exported = json.loads((Path(directory) / "export.json").read_text()).get("model") or {}
    new_head = bool(jax.tree.leaves(head)) and not exported.get("score_head", False)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if new_head:  # a language model becoming a reward model: its scalar head starts at zero
                return nnx.merge_state(ckptr.restore(_params_dir(directory), rest), zero_head_like(head))
            return ckptr.restore(_params_dir(directory), target)
    except (ValueError, KeyError) as e:
        raise ConfigError("init.from", f"the parameters in {directory} do not fit this model "
                                       f"(compare its export.json with model.*): {e}") from None


def _config(args) -> object:
    if args.run_dir:
        if args.args:
            raise ConfigError("--run-dir", "takes the run's own config; give either --run-dir or CONFIG/overrides")
        path = Path(args.run_dir) / "config.yaml"
        if not path.is_file():
            raise ConfigError("--run-dir", f"no config.yaml in {args.run_dir}")
        cfg = config_from_dict(yaml.safe_load(path.read_text()))
        if not cfg.checkpoint.dir:  # the run's checkpoints live beside its config
            cfg.checkpoint.dir = str(Path(args.run_dir).absolute() / "checkpoints")
        return cfg
    return load_config_args(args.args)


def export(cfg, step: int | None, out: str, dtype: str | None, fmt: str = "model") -> Path:
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from maxmodel import distributed
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules

    from .checkpoint import abstract_like, as_path, restore_params
    from maxmodel.config.schema import run_dir_of
    from .step import abstract_state, concrete_shardings

    out_dir = Path(out).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError("--out", f"{out_dir} exists and is not empty")
    if fmt == "peft" and cfg.peft.method not in ("lora", "qlora"):
        raise ConfigError("--format", f"peft writes LoRA adapters, and this run has peft.method={cfg.peft.method}")
    distributed.initialize(cfg.run.cpu_devices)
    ckpt_dir = as_path(cfg.checkpoint.dir or run_dir_of(cfg) / "checkpoints")
    mesh = build_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        _, abstract = abstract_state(cfg)
        shardings = concrete_shardings(abstract, mesh)
        step, params = restore_params(ckpt_dir, abstract_like(abstract, shardings), step)
        if fmt == "peft":
            if jax.process_index() == 0:
                from maxmodel.finetune.peft.hf_peft import save_peft
                save_peft(cfg, jax.device_get(params).to_pure_dict(), out_dir)
                (out_dir / "export.json").write_text(json.dumps({"step": step, "source": str(ckpt_dir),
                                                                 "format": "peft"}, indent=1))
            return out_dir
        if cfg.peft.method != "none":  # fold the adapters in: a plain model of the base's shape
            from .peft_params import merged_params
            params = merged_params(cfg, params)
        if dtype:  # cast where the shards are; the tree never gathers on one device
            params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=shardings)(params)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(_params_dir(out_dir), params)
    if jax.process_index() == 0:
        from maxmodel.config.schema import to_dict
        from maxmodel.data.tokenizer import copy_hf_tokenizer
        if cfg.data.tokenizer.endswith(".json"):  # a Hugging Face tokenizer: `convert to-hf` carries it on
            copy_hf_tokenizer(Path(cfg.data.tokenizer), out_dir)
        spm = Path(cfg.data.tokenizer) if cfg.data.tokenizer.endswith(".model") else run_dir_of(cfg) / "tokenizer.model"
        if spm.is_file():  # the sentencepiece model the run trained (or was given): generation needs it
            shutil.copy(spm, out_dir / "tokenizer.model")
        (out_dir / "export.json").write_text(jsonio.dumps(
            {"step": step, "source": str(ckpt_dir), "dtype": dtype or cfg.train.param_dtype,
             "scan_layers": cfg.train.scan_layers, "model": to_dict(cfg.model),
             **({"tokenizer": cfg.data.tokenizer} if _named_tokenizer(cfg.data.tokenizer) else {})}, indent=1))
    return out_dir


def _named_tokenizer(spec: str) -> bool:
    """A tokenizer known by name (bytes, a tiktoken encoding), not a file: export.json records it, since
    there is no file to copy beside the weights."""
    return spec != "spm" and not Path(spec).suffix


def from_base(cfg, directory: str, param_shardings):
    """A new peft run's parameters over an exported base model (init.from): the base restored with a
    peft.method=none model's shapes and shardings, then the method's adapters attached (and, for qlora, the
    base quantized) inside jit, each array created where its shards are. Call under the run's mesh + rules."""
    import dataclasses

    import jax
    from flax import nnx

    from maxmodel.finetune import peft

    from .checkpoint import abstract_like
    from .step import abstract_state, concrete_shardings
    base_cfg = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, method="none"))
    graphdef, abstract = abstract_state(base_cfg)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    base = load_params(directory, abstract_like(abstract, concrete_shardings(abstract, mesh)))

    def build(base):
        return nnx.split(peft.attach(nnx.merge(graphdef, base), cfg, nnx.Rngs(cfg.train.seed + 1)))[1]
    return jax.jit(build, out_shardings=param_shardings)(base)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")
    parser.add_argument("--format", choices=("model", "peft"), default="model",
                        help="model: the weights (adapters merged in); peft: the LoRA adapters alone, in PEFT's format")
    parser.add_argument("--run-dir", default=None, help="a run directory: use its config.yaml and checkpoints")
    parser.add_argument("args", nargs="*", help="or: an optional CONFIG.yaml, then key.sub=value overrides")
    args = parser.parse_args(argv)
    cfg = _config(args)
    from maxmodel.logs import setup_logging
    setup_logging()
    out = export(cfg, args.step, args.out, args.dtype, args.format)
    what = "adapters (PEFT format)" if args.format == "peft" else "parameters"
    print(f"exported step {json.loads((out / 'export.json').read_text())['step']} {what} to {out}")
    return 0
