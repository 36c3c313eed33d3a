"""Run by test_data_pipeline.py in fresh processes (not collected by pytest).

  python data_worker.py resume SPEC.json OUT.npz     restore an iterator state, write the next batches
  python data_worker.py multihost SPEC.json OUT.npz  process i of 2 (2 CPU devices each) on 127.0.0.1
"""
import json
import sys
from pathlib import Path

import numpy as np


def resume(spec: dict, out: str) -> None:
    from maxmodel.config import load_config
    from maxmodel.data.pipeline import make_train_data
    data = make_train_data(load_config(overrides=spec["overrides"]), Path(spec["run_dir"]))
    data.train.set_state(json.loads(spec["state"]))
    batches = [next(data.train) for _ in range(spec["batches"])]
    np.savez(out, **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})


def multihost(spec: dict, out: str) -> None:
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{spec['port']}", num_processes=2,
                               process_id=spec["process_id"])
    from flax import nnx
    from jax.experimental import multihost_utils

    from maxmodel.config import load_config
    from maxmodel.data.pipeline import make_train_data
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.step import global_batch
    cfg = load_config(overrides=spec["overrides"])
    mesh = build_mesh(cfg.mesh)
    assert jax.process_count() == 2 and mesh.devices.size == 4
    data = make_train_data(cfg, Path(spec["run_dir"]), jax.process_index(), jax.process_count())
    local, gathered = [], []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        for _ in range(spec["batches"]):
            rows = next(data.train)
            batch = global_batch(rows, mesh)  # jax.make_array_from_process_local_data
            assert batch["inputs"].shape == (cfg.train.batch_size, cfg.train.seq_len)
            local.append(rows["inputs"])
            gathered.append(np.asarray(multihost_utils.process_allgather(batch["inputs"], tiled=True)))
    np.savez(out, local=np.stack(local), gathered=np.stack(gathered))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, spec_file, out_file = sys.argv[1:]
    {"resume": resume, "multihost": multihost}[mode](json.loads(Path(spec_file).read_text()), out_file)
