"""`maxmodel recipe FILE.yaml [key=value ...] [STAGE:key=value ...]`: a multi-stage post-training pipeline,
e.g. DeepSeek-R1's sft -> grpo -> rejection-sample -> sft, each stage starting from the previous one's output.

    output_dir: runs/arith-recipe          # every stage writes under it: <output_dir>/<stage name>/
    common: {model.d_model: 64, ...}       # overrides for every train stage (a mapping or a key=value list)
    stages:
      - {name: data, call: maxmodel.finetune.tasks.arithmetic.write, args: {out_dir: "${output_dir}/data"}}
      - {name: sft, train: {train.objective: sft, data.path: "${output_dir}/data/sft.jsonl", ...}}
      - {name: grpo, train: {train.objective: grpo, ...}}          # init.from: the previous stage's model
      - {name: best, synthesize: {prompts: ..., n: 8, keep: best, rewards: [...]}}   # from the latest model
      - {name: sft2, train: {data.path: "${best.data}", ...}}

A `train` stage is `maxmodel train` (optionally `config: FILE.yaml` beside `train:` overrides) with
run.output_dir = output_dir and run.name = the stage's name; unless it sets init.from, it starts from the
latest model an earlier stage produced, and when it finishes its weights are exported to
<output_dir>/<name>/model (`${name.model}`). A `synthesize` stage writes <output_dir>/<name>/data.jsonl
(`${name.data}`; finetune/synthesize.py's settings). A `call` stage calls a function by dotted path.
`${output_dir}` and `${stage.model}` / `${stage.data}` are substituted in every string.

Progress is kept in <output_dir>/recipe.json: a rerun skips finished stages and resumes an unfinished
train stage from its checkpoint (a preempted stage exits 3, like `maxmodel train`).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from maxmodel import jsonio
from maxmodel.config import ConfigError

log = logging.getLogger("maxmodel.recipe")
KINDS = ("train", "synthesize", "call")
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


def _overrides(value, key: str) -> list[str]:
    """A mapping or a key=value list, as `maxmodel train` overrides."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={_yaml_value(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise ConfigError(key, f"expected a mapping of config keys or a list of key=value strings, got {value!r}")


def _yaml_value(v) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")


class Recipe:
    def __init__(self, path: str | Path, overrides: list[str] = (), output_dir: str | Path | None = None):
        self.path = Path(path)
        try:
            spec = yaml.safe_load(self.path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError("RECIPE", f"{self.path}: {e}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
            raise ConfigError("stages", f"{self.path} needs a non-empty `stages` list")
        unknown = set(spec) - {"output_dir", "common", "stages"}
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"{self.path}: unknown recipe key (output_dir, common, stages)")
        self.output_dir = Path(output_dir or spec.get("output_dir") or Path("runs") / self.path.stem)
        self.common = _overrides(spec.get("common"), "common")
        self.stages = [self._stage(s, i) for i, s in enumerate(spec["stages"])]
        names = [s["name"] for s in self.stages]
        for o in overrides:  # NAME:key=value for one stage, key=value for every train stage
            stage, sep, rest = o.partition(":")
            if sep and "=" not in stage:
                if stage not in names:
                    raise ConfigError(o, f"no stage named {stage!r} (stages: {', '.join(names)})")
                self.stages[names.index(stage)].setdefault("extra", []).append(rest)
            else:
                self.common.append(o)
        self.state_file = self.output_dir / "recipe.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def _stage(self, s, i: int) -> dict:
        key = f"stages[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not re.fullmatch(r"[\w-]+", s["name"]):
            raise ConfigError(key, "each stage needs a `name` (letters, digits, _ or -)")
        kinds = [k for k in KINDS if k in s]
        if len(kinds) != 1:
            raise ConfigError(key, f"stage {s['name']!r} needs exactly one of {', '.join(KINDS)}")
        extra = set(s) - {"name", "config", "args", *KINDS}
        if extra:
            raise ConfigError(f"{key}.{sorted(extra)[0]}", f"unknown stage key in {s['name']!r}")
        return {**s, "kind": kinds[0], "key": key}

    # ---- references

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, str):
            return REFERENCE.sub(lambda m: self._lookup(m.group(1)), value)
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        return value

    def _lookup(self, ref: str) -> str:
        if ref == "output_dir":
            return str(self.output_dir)
        stage, _, what = ref.partition(".")
        found = self.state.get(stage, {}).get(what)
        if found is None:
            raise ConfigError(f"${{{ref}}}", f"no stage before this one produced {what or 'anything'} as {stage!r}")
        return found

    def _latest_model(self) -> str | None:
        models = [self.state[s["name"]]["model"] for s in self.stages
                  if "model" in self.state.get(s["name"], {})]
        return models[-1] if models else None

    def _save(self, name: str, **outputs) -> None:
        self.state[name] = {"done": True, **outputs}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(jsonio.dumps(self.state, indent=1))
        tmp.replace(self.state_file)  # a crash never leaves a half-written progress file

    # ---- running

    def run(self, stop_at: tuple[str, int] | None = None) -> dict:
        """Run every unfinished stage in order; `stop_at=(stage, step)` stops that train stage early (as a
        preemption would). Returns the progress state."""
        for stage in self.stages:
            name = stage["name"]
            if self.state.get(name, {}).get("done"):
                log.info("recipe: stage %s is done, skipping", name)
                continue
            log.info("recipe: stage %s (%s)", name, stage["kind"])
            stop = stop_at[1] if stop_at and stop_at[0] == name else None
            outputs = getattr(self, f"_run_{stage['kind']}")(stage, stop)
            if outputs is None:  # stopped early
                return self.state
            self._save(name, **outputs)
        return self.state

    def _run_train(self, stage: dict, stop: int | None):
        from maxmodel.config import load_config
        from maxmodel.train.export import export
        from maxmodel.train.loop import train
        name = stage["name"]
        over = self._resolve(self.common + _overrides(stage["train"], f"{stage['key']}.train")
                             + stage.get("extra", []))
        over += [f"run.output_dir={self.output_dir}", f"run.name={name}"]
        latest = self._latest_model()
        if latest and not any(o.startswith("init.from=") for o in over):
            over.append(f"init.from={latest}")
        config = self._resolve(stage.get("config"))
        cfg = load_config(Path(config) if config else None, over)
        result = train(cfg, stop_at_step=stop)
        if result.final_step < cfg.train.steps:
            return None
        model_dir = self.output_dir / name / "model"
        if not (model_dir / "export.json").is_file():
            export(cfg, None, str(model_dir), None)
        return {"model": str(model_dir), "step": result.final_step}

    def _run_synthesize(self, stage: dict, stop):
        from maxmodel.inference.load import load_engine

        from .synthesize import SynthesisSpec, synthesize
        settings = dict(self._resolve(stage["synthesize"]))
        model = settings.pop("model", None) or self._latest_model()
        if not model:
            raise ConfigError(f"{stage['key']}.synthesize.model", "no model to sample from: set model or put a "
                                                                  "train stage first")
        engine = {k: settings.pop(k) for k in ("max_slots", "max_len") if k in settings}
        out = self.output_dir / stage["name"] / "data.jsonl"
        try:
            spec = SynthesisSpec(out=str(out), overwrite=True, **settings)  # a rerun rewrites the same file
        except TypeError as e:
            raise ConfigError(f"{stage['key']}.synthesize", str(e)) from None
        generator = load_engine(model, ["run.cpu_devices=1", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"],
                                **engine)
        stats = synthesize(generator, spec)
        log.info("recipe: %s wrote %d records (%d dropped)", out, stats["written"], stats["dropped"])
        return {"data": str(out), "written": stats["written"]}

    def _run_call(self, stage: dict, stop):
        from maxmodel.imports import import_callable
        fn = import_callable(stage["call"], f"{stage['key']}.call")
        result = fn(**self._resolve(stage.get("args") or {}))
        return {"result": result} if isinstance(result, (dict, list, str, int, float)) else {}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="the recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value for every train stage, STAGE:key=value for one")
    parser.add_argument("--output-dir", default=None, help="instead of the recipe's output_dir")
    args = parser.parse_intermixed_args(argv)  # overrides may come after --output-dir
    from maxmodel.logs import setup_logging
    from maxmodel.train.loop import Preempted
    setup_logging()
    recipe = Recipe(args.recipe, args.overrides, args.output_dir)
    try:
        state = recipe.run()
    except Preempted as e:
        print(f"maxmodel recipe: {e}; rerun the same command to continue", flush=True)
        return 3
    print(jsonio.dumps(state, indent=1))
    return 0
