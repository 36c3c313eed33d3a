"""Pipeline schedules (GPipe, circular) against a plain loop over the layers, on 8 emulated CPU devices."""
import functools

import jax

try:  # must happen before JAX initialises its backend; a conftest may already have done it
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:
    pass

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxmodel.parallel.pipeline import bubble_fraction, pipeline_apply, stage_major_order

AXES = ("data", "stage", "fsdp", "sequence", "tensor", "expert")
LAYERS, BATCH, SEQ, DIM, FF = 8, 16, 4, 32, 64

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")


def make_mesh(data=1, stage=1, fsdp=1, tensor=1):
    return jax.make_mesh((data, stage, fsdp, 1, tensor, 1), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def layer_fn(p, h, aux):
    """Residual MLP whose update depends on per-example aux inputs (padding mask, positions)."""
    u = jax.nn.gelu((h + 0.01 * aux["positions"][..., None]) @ p["w_in"] + p["b_in"]) @ p["w_out"]
    return h + u * (aux["segment_ids"] != 0)[..., None]


def plain_layer_fn(p, h):
    return h + jnp.tanh(h @ p["w_in"] + p["b_in"]) @ p["w_out"]


def sequential(fn, params, x, aux=None):
    for i in range(LAYERS):
        p = jax.tree.map(lambda a, i=i: a[i], params)
        x = fn(p, x) if aux is None else fn(p, x, aux)
    return x


@functools.partial(jax.jit, static_argnames="with_aux")
def _reference(params, x, aux, cot, with_aux):
    fn = layer_fn if with_aux else plain_layer_fn
    out, vjp = jax.vjp(lambda p, x: sequential(fn, p, x, aux if with_aux else None), params, x)
    return out, vjp(cot)


def reference(fn, params, x, aux, cot):
    """Output and gradients (for the loss sum(out * cot)) of the plain loop over the layers."""
    return _reference(params, x, aux, cot, with_aux=fn is layer_fn)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {"w_in": rng.normal(size=(LAYERS, DIM, FF)) * 0.2, "b_in": rng.normal(size=(LAYERS, FF)) * 0.1,
              "w_out": rng.normal(size=(LAYERS, FF, DIM)) * 0.2}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(rng.normal(size=(BATCH, SEQ, DIM)), jnp.float32)
    aux = {"segment_ids": jnp.asarray(rng.integers(0, 3, size=(BATCH, SEQ)), jnp.int32),
           "positions": jnp.asarray(rng.integers(0, 50, size=(BATCH, SEQ)), jnp.int32)}
    cot = jnp.asarray(rng.normal(size=(BATCH, SEQ, DIM)), jnp.float32)
    return params, x, aux, cot


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def check_against_sequential(problem, mesh, *, stages, microbatches, repeats=1, stage_major=False,
                             with_aux=True):
    params, x, aux, cot = problem
    fn = layer_fn if with_aux else plain_layer_fn
    aux = aux if with_aux else None

    ref_out, ref_grads = reference(fn, params, x, aux, cot)

    # Place the inputs as a train step would: layers over stage, d_ff over tensor, d_model over fsdp,
    # batch over data and fsdp.
    order = stage_major_order(LAYERS, stages, repeats) if stage_major else np.arange(LAYERS)
    specs = {"w_in": P("stage", "fsdp", "tensor"), "b_in": P("stage", "tensor"),
             "w_out": P("stage", "tensor", "fsdp")}
    placed = {k: jax.device_put(v[order], NamedSharding(mesh, specs[k])) for k, v in params.items()}
    x_placed = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))

    def run(params, x):
        return pipeline_apply(fn, params, x, mesh=mesh, num_stages=stages, num_microbatches=microbatches,
                              repeats=repeats, aux=aux, stage_major=stage_major)

    def forward_and_grads(params, x):  # one program, one compile
        out, vjp = jax.vjp(run, params, x)
        return out, vjp(cot)

    compiled = jax.jit(forward_and_grads).lower(placed, x_placed).compile()
    assert "collective-permute" in compiled.as_text()
    out, grads = compiled(placed, x_placed)
    assert rel_err(out, ref_out) < 1e-5
    inv = np.argsort(order)
    for k in params:
        assert rel_err(grads[0][k][inv], ref_grads[0][k]) < 1e-5, k
    assert rel_err(grads[1], ref_grads[1]) < 1e-5
    return grads


@pytest.mark.parametrize("microbatches,with_aux", [(4, True), (8, False)])
def test_gpipe_four_stages(problem, microbatches, with_aux):
    check_against_sequential(problem, make_mesh(stage=4), stages=4, microbatches=microbatches,
                             with_aux=with_aux)


@pytest.mark.parametrize("stage_major", [False, True])
def test_circular_two_stages_two_repeats(problem, stage_major):
    check_against_sequential(problem, make_mesh(stage=2), stages=2, microbatches=4, repeats=2,
                             stage_major=stage_major)


def test_composes_with_data_and_tensor(problem):
    grads = check_against_sequential(problem, make_mesh(stage=2, data=2, tensor=2), stages=2, microbatches=4)
    # The gradient stays stage- and tensor-sharded like its parameter.
    assert grads[0]["w_in"].sharding.shard_shape(grads[0]["w_in"].shape) == (LAYERS // 2, DIM, FF // 2)


def test_circular_composes_with_fsdp_and_tensor(problem):
    check_against_sequential(problem, make_mesh(stage=2, fsdp=2, tensor=2), stages=2, microbatches=2,
                             repeats=2, stage_major=True)


def test_stage_major_order():
    # 8 layers, 2 stages, 2 repeats: virtual stages [0,1] [2,3] [4,5] [6,7]; device 0 holds vs 0 and 2.
    np.testing.assert_array_equal(stage_major_order(8, 2, 2), [0, 1, 4, 5, 2, 3, 6, 7])
    np.testing.assert_array_equal(stage_major_order(8, 4, 1), np.arange(8))


def test_bubble_fraction():
    assert bubble_fraction(1, 7) == 0.0
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(2, 4, repeats=2) == pytest.approx(1 / 9)
    # More microbatches or more repeats shrink the bubble.
    assert bubble_fraction(4, 16) < bubble_fraction(4, 8) < bubble_fraction(4, 4)
    assert bubble_fraction(4, 8, repeats=4) < bubble_fraction(4, 8, repeats=2) < bubble_fraction(4, 8)
    with pytest.raises(ValueError, match="num_microbatches=0"):
        bubble_fraction(4, 0)


def test_bad_layouts_raise_clear_errors(problem):
    params, x, aux, _ = problem
    mesh = make_mesh(stage=4)
    kw = {"mesh": mesh, "num_stages": 4, "num_microbatches": 4, "aux": aux}
    with pytest.raises(ValueError, match="num_layers=8 is not divisible by stages\\*repeats=4\\*3"):
        pipeline_apply(layer_fn, params, x, repeats=3, **kw)
    with pytest.raises(ValueError, match="num_stages=2 but mesh axis stage=4"):
        pipeline_apply(layer_fn, params, x, **{**kw, "num_stages": 2})
    with pytest.raises(ValueError, match="batch size 16 is not divisible by num_microbatches=3"):
        pipeline_apply(layer_fn, params, x, **{**kw, "num_microbatches": 3})
    with pytest.raises(ValueError, match="num_microbatches=2 < num_stages=4"):
        pipeline_apply(layer_fn, params, x, repeats=2, **{**kw, "num_microbatches": 2})
    with pytest.raises(ValueError, match="same leading dimension"):
        pipeline_apply(layer_fn, {**params, "b_in": params["b_in"][:4]}, x, **kw)


def test_ring_attention_inside_a_stage():
    """stage=2 × sequence=4: a layer that runs ring attention over `sequence` inside each pipeline stage."""
    from maxmodel.parallel.ring_attention import reference_attention, ring_attention

    mesh = jax.make_mesh((1, 2, 1, 4, 1, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
    layers, batch, length, heads, hd = 4, 4, 64, 2, 8
    rng = np.random.default_rng(1)
    params = {"wq": jnp.asarray(rng.normal(size=(layers, heads * hd, heads * hd)) * 0.2, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(batch, length, heads * hd)), jnp.float32)
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2:] = 2
    seg[:, -5:] = 0  # padding
    aux = {"seg": jnp.asarray(seg), "pos": jnp.asarray(np.tile(np.arange(length) % (length // 2), (batch, 1)))}

    def make_layer(attention):
        def layer(p, h, a):
            q = (h @ p["wq"]).reshape(*h.shape[:2], heads, hd)
            o = attention(q, q, q, a["seg"], a["seg"], a["pos"], a["pos"])
            return h + o.reshape(h.shape)
        return layer

    def ref(params, x):
        for i in range(layers):
            x = make_layer(reference_attention)({"wq": params["wq"][i]}, x, aux)
        return x

    def piped(params, x):
        return pipeline_apply(make_layer(ring_attention), params, x, num_stages=2, num_microbatches=2, aux=aux,
                              length_axis="sequence")

    x_placed = jax.device_put(x, NamedSharding(mesh, P(None, "sequence")))
    with jax.set_mesh(mesh):  # both schedules find the mesh from the context
        out = jax.jit(piped)(params, x_placed)
        grads = jax.jit(jax.grad(lambda p, x: jnp.sum(piped(p, x) ** 2)))(params, x_placed)
    assert rel_err(out, jax.jit(ref)(params, x)) < 1e-5
    ref_grads = jax.jit(jax.grad(lambda p, x: jnp.sum(ref(p, x) ** 2)))(params, x)
    assert rel_err(grads["wq"], ref_grads["wq"]) < 1e-5


def _stage_config(*overrides):
    from conftest import TINY

    from maxmodel.config import load_config
    return load_config(overrides=TINY + ["model.num_layers=4", "mesh.data=4", "mesh.stage=2", *overrides])


def test_stage_alone_implies_the_pipeline_rules():
    from maxmodel.parallel.mesh import build_mesh, check_layout
    from maxmodel.parallel.rules import mesh_rules
    cfg = _stage_config()
    assert cfg.mesh.rules == "auto"
    mesh = build_mesh(cfg.mesh)
    check_layout(cfg, dict(mesh.shape))
    assert dict(mesh_rules(cfg.mesh, mesh))["layers"] == "stage"
    # without stages, auto is the default table (layers replicated)
    flat = build_mesh(_stage_config("mesh.stage=1", "mesh.data=8").mesh)
    assert dict(mesh_rules(cfg.mesh, flat))["layers"] is None


def test_an_explicit_table_without_layers_on_stage_contradicts_stages():
    from maxmodel.config import ConfigError
    from maxmodel.parallel.mesh import check_layout
    shape = {"data": 4, "stage": 2, "fsdp": 1, "sequence": 1, "tensor": 1, "expert": 1}
    with pytest.raises(ConfigError, match=r"mesh.rules.*mesh.rules=fsdp.*mesh.stage=2"):
        check_layout(_stage_config("mesh.rules=fsdp"), shape)
    check_layout(_stage_config("mesh.rules=pipeline"), shape)  # explicit and consistent
    check_layout(_stage_config("mesh.rules=fsdp", "mesh.rule_overrides.layers=stage"), shape)


@pytest.mark.parametrize("stages,microbatches,repeats", [(2, 2, 1), (4, 8, 1), (4, 16, 1), (2, 4, 2), (4, 8, 2),
                                                         (2, 8, 4)])
def test_1f1b_schedules_keep_dependencies_and_the_in_flight_cap(stages, microbatches, repeats):
    """Replaying the table: every forward and backward of every (microbatch, virtual stage) once, each after
    what it needs (at an earlier tick), one step per device per tick, and never more microbatches in flight
    on a device than its cap; 1F1B takes 2(M + S - 1) ticks, Megatron's count, and interleaved 2(M·R + S - 1)."""
    from maxmodel.parallel.schedules import BACKWARD, FORWARD, in_flight_cap, make_schedule
    S, M, R = stages, microbatches, repeats
    sched = make_schedule(S, M, R)
    V = S * R
    f, b, flying = {}, {}, [0] * S
    for t in range(sched.ticks):
        for d in range(S):
            op, m, r = sched.op[t, d], sched.mb[t, d], sched.rep[t, d]
            v = r * S + d
            if op == FORWARD:
                assert (m, v) not in f and (v == 0 or f[(m, v - 1)] < t)
                f[(m, v)] = t
                flying[d] += 1
                assert flying[d] <= in_flight_cap(S, R, d)
            elif op == BACKWARD:
                assert (m, v) not in b and f[(m, v)] < t and (v == V - 1 or b[(m, v + 1)] < t)
                b[(m, v)] = t
                flying[d] -= 1
    assert len(f) == len(b) == M * V
    assert sched.ticks == 2 * (M * R + S - 1)  # every device busy but for 2(S - 1) ticks
    if R == 1:
        assert sched.stash_slots == S


@pytest.mark.parametrize("stages,microbatches", [(2, 2), (2, 4), (4, 4), (4, 8), (4, 16), (8, 16)])
def test_zero_bubble_schedule_splits_every_backward_and_keeps_the_1f1b_cap(stages, microbatches):
    """Replaying the zero-bubble table: F, B and W of every (microbatch, stage) once; B after F and after the
    next stage's B, W after its B (at earlier ticks), each W reading the cotangent slot its B wrote with no
    other B writing that slot in between; never more microbatches held (forwarded, W not yet run) than the
    1F1B cap, so the stash stays at S inputs. In units of one forward (a 1F1B backward is two: input and
    weight gradients), it takes fewer than 1F1B's 3(M + S - 1) and at least the ideal 3M + S - 1."""
    from maxmodel.parallel.schedules import BACKWARD, FORWARD, WEIGHT, in_flight_cap, make_schedule
    S, M = stages, microbatches
    sched = make_schedule(S, M, split_backward=True)
    done = {FORWARD: {}, BACKWARD: {}, WEIGHT: {}}
    held, ct_owner = [0] * S, {}
    for t in range(sched.ticks):
        for d in range(S):
            op, m = int(sched.op[t, d]), int(sched.mb[t, d])
            if op == 0:
                continue
            assert (m, d) not in done[op]
            done[op][(m, d)] = t
            if op == FORWARD:
                assert d == 0 or done[FORWARD][(m, d - 1)] < t
                held[d] += 1
                assert held[d] <= in_flight_cap(S, 1, d)
            elif op == BACKWARD:
                assert done[FORWARD][(m, d)] < t and (d == S - 1 or done[BACKWARD][(m, d + 1)] < t)
                ct_owner[(d, int(sched.ct[t, d]))] = m
            else:
                assert done[BACKWARD][(m, d)] < t and ct_owner[(d, int(sched.ct[t, d]))] == m
                held[d] -= 1
    assert all(len(v) == M * S for v in done.values())
    assert 3 * M + S - 1 <= sched.ticks < 3 * (M + S - 1)
    assert sched.stash_slots == S


def test_1f1b_keeps_as_many_stage_inputs_whatever_the_microbatch_count():
    from maxmodel.parallel.schedules import make_schedule
    assert make_schedule(4, 4).stash_slots == make_schedule(4, 32).stash_slots == 4
    assert make_schedule(4, 8, 2).stash_slots == make_schedule(4, 32, 2).stash_slots


@pytest.mark.parametrize("extra,key", [
    (["pipeline.schedule=1f1b", "pipeline.repeats=2"], "pipeline.repeats"),
    (["pipeline.schedule=interleaved_1f1b"], "pipeline.repeats"),
    (["pipeline.schedule=1f1b", "train.objective=prefix_lm"], "pipeline.schedule"),
    (["pipeline.schedule=chimera"], "pipeline.schedule"),
    (["pipeline.schedule=zero_bubble", "pipeline.repeats=2"], "pipeline.repeats"),
])
def test_bad_schedules_name_their_key(extra, key):
    from maxmodel.config import ConfigError, load_config
    from maxmodel.parallel.mesh import check_layout
    over = ["model.num_layers=4", "mesh.data=2", "mesh.stage=4", "train.batch_size=16"]
    with pytest.raises(ConfigError, match=key):
        cfg = load_config(overrides=over + extra)
        check_layout(cfg, {"data": 2, "stage": 4, "fsdp": 1, "sequence": 1, "tensor": 1, "expert": 1})
