"""MODEL -> a ready `Generator`: a model directory (`maxmodel export`, `maxmodel convert from-hf`) or a run
directory (its latest checkpoint), with its own tokenizer; no conversion step."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from maxmodel.config import ConfigError
from maxmodel.config.loader import apply_mapping, load_config, parse_overrides, set_value

log = logging.getLogger("maxmodel.inference")


def model_config(path: Path, overrides=()):
    """The model's config: its config.yaml (resolved run config, or the converter's), else export.json's model;
    `overrides` (key=value) on top. Decoding needs no pipeline or sequence split: those axes are folded."""
    if (path / "config.yaml").is_file():
        cfg = load_config(path / "config.yaml", overrides)
    elif (path / "export.json").is_file():
        from maxmodel.config.derive import derive_values
        from maxmodel.config.validate import validate
        info = json.loads((path / "export.json").read_text())
        cfg = load_config(None, (), derive=False)
        from maxmodel.interop.convert import scan_layout
        apply_mapping(cfg, {"model": info["model"], "train": {"scan_layers": scan_layout(path, info)}},
                      source=str(path / "export.json"))
        for key, value in parse_overrides(list(overrides)):
            set_value(cfg, key, value, from_text=True)
        derive_values(cfg)
        validate(cfg)
    else:
        raise ConfigError("MODEL", f"{path} is not a model directory or a run directory (no config.yaml or "
                                   f"export.json)")
    if cfg.model.arch != "decoder":
        raise ConfigError("model.arch", f"generation needs a decoder-only model; {path} is '{cfg.model.arch}'")
    if cfg.mesh.stage != 1 or cfg.mesh.sequence != 1:
        log.info("decoding folds mesh.stage=%d and mesh.sequence=%d into data", cfg.mesh.stage, cfg.mesh.sequence)
    cfg.mesh.stage = cfg.mesh.sequence = 1
    if cfg.mesh.rules == "pipeline":  # stacked layers stay whole: decoding runs every layer on every device
        cfg.mesh.rules = "auto"
    return cfg


def model_tokenizer(path: Path, cfg):
    """The tokenizer the model was trained with: tokenizer.json / tokenizer.model beside the weights, else
    the run's (data.tokenizer, or the sentencepiece model the run trained into its directory)."""
    from maxmodel.data.tokenizer import load_tokenizer
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            return load_tokenizer(str(path / name))
    export = path / "export.json"
    named = json.loads(export.read_text()).get("tokenizer") if export.is_file() else None
    if named:  # a tokenizer known by name (bytes, a tiktoken encoding), recorded by `maxmodel export`
        return load_tokenizer(named)
    if cfg.data.tokenizer == "spm":
        raise ConfigError("MODEL", f"{path} has no tokenizer.json or tokenizer.model (the run's sentencepiece "
                                   f"model) and data.tokenizer is 'spm'; set data.tokenizer=PATH")
    return load_tokenizer(cfg.data.tokenizer)


def _restore(path: Path, cfg, abstract, shardings):
    """A model directory's params/, else the latest checkpoint of the run directory."""
    from maxmodel.train.checkpoint import abstract_like, restore_params
    from maxmodel.train.export import load_params
    target = abstract_like(abstract, shardings)
    if (path / "export.json").is_file() and (path / "params").is_dir():
        return load_params(str(path), target)
    step, params = restore_params(cfg.checkpoint.dir or path / "checkpoints", target, key="MODEL")
    log.info("loaded step %d of %s", step, path)
    return params


def restore_model(path: Path, cfg, mesh):
    """(graphdef, params) of the model at `path` (model or run directory, config `cfg`), each parameter
    sharded on `mesh` by the logical rules in effect: call under the mesh and rules."""
    from maxmodel.train.step import abstract_state, concrete_shardings
    graphdef, abstract = abstract_state(cfg)
    return graphdef, _restore(Path(path), cfg, abstract, concrete_shardings(abstract, mesh))


def prune_vocabulary(cfg, params, n: int):
    """(cfg, params) of the same model over its first `n` token ids: the embedding table's rows and the head's
    columns past them dropped. For a speculative draft whose tokenizer has fewer pieces than the padded
    vocabulary (FR-Spec's pruned draft head): its cost per proposal is mostly the head."""
    import dataclasses

    from flax import nnx
    m = cfg.model
    if not 0 < n <= m.vocab_size:
        raise ConfigError("--draft-vocab", f"{n} must be in 1..{m.vocab_size} (the draft's vocab_size)")
    flat = []
    for path, var in nnx.to_flat_state(params):
        names = tuple(str(p) for p in path)
        if names == ("embed", "table"):
            var = var.replace(var.get_value()[:n])
        elif names == ("head",):
            var = var.replace(var.get_value()[:, :n])
        flat.append((path, var))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=n))
    return cfg, nnx.from_flat_state(flat)


def load_engine(model_path, overrides=(), quantize: str | None = None, draft=None, draft_tokens: int = 4,
                ngram: int = 0, prefix_cache_gb: float = 0.0, prefix_cache_dir=None, prefix_cache_disk_gb: float = 0.0,
                draft_vocab: int = 0, **engine_options):
    """A Generator over the model at `model_path`. `engine_options` are EngineOptions fields (max_slots,
    max_len, prefill_buckets, spare, kv_int8). Speculative decoding: `draft` = a draft model directory
    (loaded like the target; over its first `draft_vocab` ids when given) proposing `draft_tokens` per
    round, or else `ngram` = N for the draft-free n-gram drafter. `prefix_cache_gb` > 0 keeps prompt-prefix
    KV blocks in that much host memory (spilling to `prefix_cache_dir`, up to `prefix_cache_disk_gb`,
    default 4x the memory)."""
    from maxmodel import distributed

    from .generator import Generator

    path = Path(model_path)
    cfg = model_config(_as_dir(path), overrides)
    distributed.initialize(cfg.run.cpu_devices)
    speculative = None
    if draft is not None or ngram:
        from .speculative import SpeculativeConfig
        # ring buffers keep k+1 spare slots so that rejected tokens never overwrite keys still in the window
        engine_options["spare"] = max(engine_options.get("spare", 0), draft_tokens + 1)
    engine, tokenizer = _engine(path, cfg, quantize, engine_options)
    if draft is not None:
        draft_engine, _ = _engine(Path(draft), model_config(_as_dir(Path(draft))), quantize, engine_options,
                                  vocab=draft_vocab)
        speculative = SpeculativeConfig(draft_engine, k=draft_tokens)
    elif ngram:
        speculative = SpeculativeConfig(None, k=draft_tokens, ngram=ngram)
    generator = Generator(engine, tokenizer, name=path.resolve().name, model_dir=path, speculative=speculative)
    if prefix_cache_gb > 0:
        from .prefix_cache import PrefixCache
        disk_gb = prefix_cache_disk_gb or 4 * prefix_cache_gb
        generator.attach_prefix_cache(PrefixCache(engine, capacity_bytes=int(prefix_cache_gb * 2**30),
                                                  disk_dir=prefix_cache_dir, disk_bytes=int(disk_gb * 2**30)))
    return generator


def _as_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ConfigError("MODEL", f"{path} is not a directory")
    return path


def _engine(path: Path, cfg, quantize, engine_options, vocab: int = 0):
    """(Engine, tokenizer) for the model directory `path` with its resolved config `cfg` (over its first
    `vocab` ids only when given: prune_vocabulary)."""
    import jax
    from flax import nnx

    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from .engine import Engine, EngineOptions

    tokenizer = model_tokenizer(path, cfg)
    devices = jax.devices()
    if devices[0].platform == "cpu" and jax.process_count() == 1:  # the emulated devices run.cpu_devices asks for
        devices = devices[:cfg.run.cpu_devices]
    mesh = build_mesh(cfg.mesh, devices)
    rules = mesh_rules(cfg.mesh, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, params = restore_model(path, cfg, mesh)
        if vocab:
            cfg, params = prune_vocabulary(cfg, params, vocab)
        if quantize:
            from .quantize import quantize_params
            params = quantize_params(cfg, params, quantize)
    return Engine(cfg, graphdef, params, mesh, rules, EngineOptions(**engine_options)), tokenizer
