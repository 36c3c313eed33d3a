"""Hugging Face safetensors <-> the `maxmodel export` layout (`params/` orbax tree + `export.json`).

Both directions stream (orbax_stream.py): from_hf reads each HF tensor alone (safe_open) when Orbax writes
the slice of our parameter it becomes (scanned layouts stack layers on axis 0, one layer a chunk); to_hf
reads each slice it needs from the opened checkpoint and writes safetensors shards of at most
--max-shard-size, one shard in memory at a time. Peak memory: `benchmarks/convert_memory.py`.
"""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from maxmodel import jsonio
from maxmodel.config.errors import ConfigError
from maxmodel.config.schema import Config, ModelConfig, to_dict
from maxmodel.data.tokenizer import copy_hf_tokenizer

from . import hf_config
from .orbax_stream import Streamed, fetch, open_lazy, save_streamed
from .safetensors_io import Reader, ShardedWriter
from .weights import BUFFERS, rules_for

log = logging.getLogger("maxmodel.convert")


def _np_dtype(name: str):
    import ml_dtypes  # numpy has no bfloat16; jax's ml_dtypes provides it
    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def _abstract_leaves(cfg: Config):
    """({dotted parameter path: ShapeDtypeStruct}, the abstract nnx.State) for this config's layout."""
    import jax
    from flax import nnx

    from maxmodel.models.registry import build_model
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        out[".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))] = leaf
    return out, state


def _state_from(state, arrays: dict):
    import jax

    def pick(path, _):
        return arrays[".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))]
    return jax.tree_util.tree_map_with_path(pick, state)


def _hf_name(reader: Reader, name: str) -> str:
    """GPT-2 checkpoints from the Hub omit the `transformer.` prefix that save_pretrained writes."""
    if name not in reader and name.startswith("transformer.") and name[len("transformer."):] in reader:
        return name[len("transformer."):]
    return name


def _our_slot(base: str, layer: int | None, scan: bool, part: int | None) -> tuple[str, tuple[int, ...]]:
    """(leaf path, index of the rule's slice in it): the layer along a scanned stack's axis 0, then the
    rule's part (an expert)."""
    index = () if part is None else (part,)
    if layer is None:
        return base, index
    return (f"layers.{base}", (layer, *index)) if scan else (f"layers.{layer}.{base}", index)


def _fused_experts(reader: Reader) -> bool:
    """Mixtral saved with transformers 5's fused expert tensors rather than the Hub's per-expert ones."""
    return any(name.endswith(".mlp.experts.gate_up_proj") for name in reader.weight_map)


@contextmanager
def _new_output(out_dir: Path):
    """--out must be new or empty, and is left empty again when the conversion fails, so the same command can
    simply be run again."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError("--out", f"{out_dir} exists and is not empty")
    try:
        yield
    except BaseException:
        for child in out_dir.iterdir() if out_dir.exists() else ():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _rule_layers(model: ModelConfig, family: str, fused_experts: bool = False) -> list[tuple]:
    """(rule, layer) in HF order: the top-level rules (layer None), then each layer's."""
    top, per_layer = rules_for(model, family, fused_experts=fused_experts)
    return [(r, None) for r in top] + [(r, i) for i in range(model.num_layers) for r in per_layer]


def _leaf_jobs(model: ModelConfig, family: str, scan_layers: bool, fused_experts: bool = False):
    """{our leaf path: [(index of a slice in it, rule, layer, which of the rule's outputs)]}, in HF order."""
    jobs: dict[str, list] = {}
    for rule, layer in _rule_layers(model, family, fused_experts):
        for k, base in enumerate(rule.ours):
            name, index = _our_slot(base, layer, scan_layers, rule.part)
            jobs.setdefault(name, []).append((index, rule, layer, k))
    return jobs


def from_hf(hf_dir: str, out: str, scan_layers: bool = True, dtype: str = "float32") -> Path:
    hf_path, out_dir = Path(hf_dir), Path(out).absolute()
    if not (hf_path / "config.json").is_file():
        raise ConfigError("DIR", f"no config.json in {hf_path}")
    with _new_output(out_dir):
        model, family = hf_config.from_hf(json.loads((hf_path / "config.json").read_text()))
        cfg = Config(model=model)
        cfg.train.scan_layers = scan_layers
        cfg.train.param_dtype = dtype
        leaves, state = _abstract_leaves(cfg)
        reader = Reader(hf_path)
        try:
            _stream_params(reader, hf_path, out_dir, _leaf_jobs(model, family, scan_layers, _fused_experts(reader)),
                           leaves, state, dtype)
        finally:
            reader.close()
        copy_hf_tokenizer(hf_path, out_dir)
        (out_dir / "export.json").write_text(jsonio.dumps(
            {"step": 0, "source": f"huggingface:{hf_path.absolute()}", "dtype": dtype, "model": to_dict(model),
             "hf_model_type": family, "scan_layers": scan_layers}, indent=1))
        _write_run_config(out_dir, model, scan_layers)
    return out_dir


def _stream_params(reader: Reader, hf_path: Path, out_dir: Path, jobs: dict, leaves: dict, state, dtype: str):
    """Write `out_dir/params`, each leaf's slices read from the HF tensors its jobs name as Orbax writes it."""
    missing = sorted(set(leaves) - set(jobs))
    if missing:
        raise ConfigError("DIR", f"no Hugging Face tensors map to {missing}")
    used = {_hf_name(reader, n.format(i=layer)) for steps in jobs.values() for _, rule, layer, _ in steps
            for n in rule.hf}
    unused = sorted(n for n in set(reader.weight_map) - used if not BUFFERS.search(n))
    if unused:  # e.g. BERT's next-sentence head: the model has nowhere to put them
        log.warning("not converted, the model has no place for them: %s (%d of %s's tensors)",
                    ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else ""), len(unused), hf_path)

    def streamed(name: str, leaf, bar) -> Streamed:
        def slices():  # read when Orbax writes this leaf: one HF tensor in memory at a time
            for index, rule, layer, k in jobs[name]:
                bar.update()
                names = [_hf_name(reader, n.format(i=layer)) for n in rule.hf]
                if rule.init and not all(n in reader for n in names):
                    log.info("%s is not in %s: initialised", ", ".join(names), hf_path)
                    yield index, rule.init(leaf.shape[len(index):])
                    continue
                value = rule.to_ours(*[reader.get(n) for n in names])[k]
                if leaf.shape[len(index):] != value.shape:
                    raise ConfigError("DIR", f"{', '.join(names)} makes a {value.shape} slice of {name}; "
                                             f"config.json asks for {leaf.shape[len(index):]}")
                yield index, value
        return Streamed(leaf.shape, np.dtype(_np_dtype(dtype)), len(jobs[name][0][0]), slices)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(len(steps) for steps in jobs.values()), desc="from-hf", unit="tensor") as bar:
        save_streamed(out_dir / "params", _state_from(state, {n: streamed(n, leaf, bar) for n, leaf in leaves.items()}))


def train_section(model: dict, scan_layers: bool) -> dict:
    """The `train:` keys a converted model (`model.*` as a dict) needs to load: its layer layout and the
    objective it was made for."""
    return {"scan_layers": scan_layers, "seq_len": min(128, model["max_seq_len"]),
            "objective": "masked_lm" if model.get("arch") == "encoder" else "causal_lm"}


def _write_run_config(out_dir: Path, model: ModelConfig, scan_layers: bool) -> None:
    """A config for `maxmodel train INIT/config.yaml init.from=INIT`: the model as converted (every model key
    is set, so model.name only needs to name an existing file), and the carried tokenizer."""
    import yaml
    m = to_dict(model)
    m["name"] = "tiny"
    cfg = {"model": m, "train": train_section(m, scan_layers)}
    if (out_dir / "tokenizer.json").is_file():
        cfg["data"] = {"tokenizer": str(out_dir / "tokenizer.json")}
    (out_dir / "config.yaml").write_text("# written by `maxmodel convert from-hf`\n" + yaml.safe_dump(cfg))


def _open_params(init_dir: Path, cfg: Config) -> dict:
    """The exported tree's leaves as opened, unread tensorstores, keyed by dotted path."""
    import jax
    leaves, _ = _abstract_leaves(cfg)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(open_lazy(init_dir / "params")):
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        out[".".join(names[:-1] if names[-1] == "value" else names)] = leaf  # nnx.Variable's value
    missing = set(leaves) - set(out)
    if missing:
        raise ConfigError("INIT", f"{init_dir} lacks parameters {sorted(missing)} of its export.json model")
    return out


def scan_layout(init_dir: Path, info: dict) -> bool:
    """Whether an export stacks its layers: export.json says so, else its parameter tree shows it."""
    if "scan_layers" in info:
        return bool(info["scan_layers"])
    import orbax.checkpoint as ocp  # a `maxmodel export` of a run: look at the tree itself
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(init_dir / "params").item_metadata.tree
    return not any(str(k).isdigit() for k in tree["layers"])


def to_hf(init: str, out: str, model_type: str | None = None, max_shard_bytes: int = 5 * 2**30,
          dtype: str | None = None) -> Path:
    init_dir, out_dir = Path(init).absolute(), Path(out).absolute()
    if not (init_dir / "export.json").is_file():
        raise ConfigError("INIT", f"{init_dir} is not a `maxmodel export` directory (no export.json)")
    with _new_output(out_dir):
        _write_hf(init_dir, out_dir, model_type, max_shard_bytes, dtype)
    return out_dir


def _write_hf(init_dir: Path, out_dir: Path, model_type: str | None, max_shard_bytes: int, dtype: str | None):
    from maxmodel.config.loader import config_from_dict
    info = json.loads((init_dir / "export.json").read_text())
    cfg = config_from_dict({"model": info["model"], "train": train_section(info["model"], scan_layout(init_dir, info))})
    model = cfg.model
    family = model_type or info.get("hf_model_type") or hf_config.guess_family(model)
    hf_cfg = hf_config.to_hf(model, family)
    stores = _open_params(init_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out_dir, max_shard_bytes)
    jobs = [(r, i) for r, i in _rule_layers(model, family) if not r.init]  # `init` ones are not in the HF class

    def start(job):  # reads of the slices a rule turns into HF tensors
        rule, layer = job
        return [fetch(stores[name], index)
                for name, index in (_our_slot(base, layer, cfg.train.scan_layers, rule.part) for base in rule.ours)]
    reading = start(jobs[0])
    for i, (rule, layer) in enumerate(tqdm(jobs, desc="to-hf", unit="tensor")):
        ours = [np.asarray(f.result()) for f in reading]
        reading = start(jobs[i + 1]) if i + 1 < len(jobs) else []  # read the next while this one is written
        for name, value in zip(rule.hf, rule.to_hf(*ours)):
            writer.add(name.format(i=layer), value.astype(_np_dtype(dtype)) if dtype else value)
    writer.close()
    if dtype:
        hf_cfg["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(jsonio.dumps(hf_cfg, indent=2))
    copy_hf_tokenizer(init_dir, out_dir)
