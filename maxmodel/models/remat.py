"""Rematerialisation policies (`train.remat`): what each layer keeps for its backward pass.

The model names its large intermediates with `checkpoint_name` (NAMES); a policy keeps some on the device,
moves some to host memory (`pinned_host`, where the backend has it: TPU, GPU, and XLA:CPU) and recomputes the
rest. Per layer, with s·b tokens per device, d = d_model, q/k = query/key-value widths, f = d_ff; recompute
as a fraction of the step's FLOPs (forward = 1/3 of a step). MaxText users know these names.

| policy               | kept on the device per layer          | recomputed in the backward pass       |
| -------------------- | ------------------------------------- | ------------------------------------- |
| none                 | everything autodiff saves             | nothing                               |
| save_dots            | every matmul output (MaxText minimal) | norms, activations, attention (~3%)   |
| save_dot_except_mlp  | input, q/k/v and attention out (d+q+2k+d) | the MLP (~2/3 of the forward: ~22%) |
| save_qkv_proj        | input and q/k/v (d + q + 2k)          | attention and MLP (~30%)              |
| qkv_proj_offloaded   | input; q/k/v go to host memory        | as save_qkv_proj, plus host transfers |
| save_dots_offloaded  | input; matmul outputs go to host      | as save_dots, plus host transfers     |
| full                 | the layer input (d)                   | the whole layer (~33%)                |

benchmarks/RESULTS.md has the compiled per-chip bytes of each on TPU topologies (benchmarks/aot_memory.py).
"""
from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

QKV = ("query_proj", "key_proj", "value_proj")
OUT = "out_proj"          # the attention block's output projection
MLP = ("mlp_in", "mlp_out")
NAMES = (*QKV, OUT, *MLP)

_cp = jax.checkpoint_policies


def _offloaded(names):
    return _cp.save_and_offload_only_these_names(names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
                                                 offload_src="device", offload_dst="pinned_host")


POLICIES = {
    "none": None,                         # no remat at all (the block is not wrapped)
    "full": None,                         # jax.checkpoint with no policy: save nothing
    "save_dots": _cp.dots_with_no_batch_dims_saveable,
    "save_dot_except_mlp": _cp.save_only_these_names(*QKV, OUT),
    "save_qkv_proj": _cp.save_only_these_names(*QKV),
    "qkv_proj_offloaded": _offloaded(QKV),
    "save_dots_offloaded": _offloaded(NAMES),
}


def name(x, label: str):
    """Tag an intermediate for the policies above (an identity outside jax.checkpoint)."""
    return checkpoint_name(x, label)
