"""The teacher of distillation: a frozen model (any size, any maxmodel model or run directory with the
student's tokenizer) restored onto the student's mesh with the run's logical rules, whose logits a Preparer
adds to every batch (`teacher_logits`, [B, L, vocab] float32, rows sharded like the batch)."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maxmodel.config.errors import ConfigError


class Teacher:
    def __init__(self, cfg, mesh):
        from maxmodel.inference.load import model_config, restore_model
        from maxmodel.train.step import batch_sharding
        path = cfg.distill.teacher
        if not path:
            raise ConfigError("distill.teacher", f"train.objective={cfg.train.objective} needs a teacher model "
                                                 f"directory")
        if not Path(path).is_dir():
            raise ConfigError("distill.teacher", f"{path} is not a directory")
        self.cfg = model_config(Path(path))
        if self.cfg.model.vocab_size != cfg.model.vocab_size:
            raise ConfigError("distill.teacher", f"the teacher's vocab_size {self.cfg.model.vocab_size} differs "
                                                 f"from the student's {cfg.model.vocab_size}: distillation needs "
                                                 f"one tokenizer")
        graphdef, self.params = restore_model(Path(path), self.cfg, mesh)
        spec = batch_sharding(mesh).spec
        out = NamedSharding(mesh, PartitionSpec(*spec, *(None,) * (3 - len(spec))))

        def logits(params, batch):
            model = nnx.merge(graphdef, params)
            return model(batch["inputs"], batch["segment_ids"], batch["positions"]).astype(jnp.float32)
        self._logits = jax.jit(logits, out_shardings=out)

    def __call__(self, batch):
        return self._logits(self.params, batch)
