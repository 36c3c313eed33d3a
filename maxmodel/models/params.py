"""Parameter counts of a config, from shapes alone (nnx.eval_shape: nothing is allocated)."""
from __future__ import annotations

import math

import jax
from flax import nnx

from maxmodel.config.schema import Config


def _named_sizes(cfg: Config) -> list[tuple[tuple[str, ...], int]]:
    from .registry import build_model
    with nnx.use_eager_sharding(False):  # shapes only: no mesh is needed
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)  # parameters only (not e.g. MoE routing-bias state)
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        out.append((names, math.prod(leaf.shape)))
    return out


def count_params(cfg: Config) -> dict[str, int]:
    """total; non_embedding (without token/position tables and the untied output head, as in Kaplan et al.);
    active (parameters used per token: the routed experts count top_k of num_experts; equals total for
    dense models)."""
    sizes = _named_sizes(cfg)
    total = sum(n for _, n in sizes)
    embedding = sum(n for names, n in sizes if names[:1] in (("embed",), ("head",)))
    moe = cfg.model.moe
    experts = sum(n for names, n in sizes if names[-1].startswith("expert_"))  # routed experts' weights
    active = total - experts + experts * moe.top_k // max(moe.num_experts, 1)
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding, "active": active}
