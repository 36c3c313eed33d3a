"""lm-evaluation-harness's own `hf` backend on a transformers model, run with the Python of `.venv-hf` (torch +
transformers + lm-eval; never maxmodel's venv): the reference the `maxmodel` backend is compared with.

  python hf_lm_eval.py SPEC_JSON     spec: pretrained (a transformers directory with its tokenizer),
                                     tasks, include_path, max_length, batch_size, limit (optional)

Prints one JSON line: {"results": lm-eval's results, "requests": {task: [[doc_id, index, response], ...]}}, a
response being [loglikelihood, is_greedy] or a rolling loglikelihood, as lm-eval returned it. The tests call
it through `run` below (which imports neither torch nor lm-eval).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hf_oracle


def run(spec: dict, timeout: float = 600) -> dict:
    """The reference results for `spec` (skips the test without .venv-hf)."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([hf_oracle.require(), __file__, json.dumps(spec)], env=env, capture_output=True, text=True,
                          check=False, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"hf_lm_eval failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def requests_of(samples: dict) -> dict:
    """{task: [[doc_id, request index, response], ...]} from simple_evaluate's logged samples."""
    out = {}
    for task, rows in samples.items():
        out[task] = sorted([int(s["doc_id"]), i, list(r[0]) if isinstance(r[0], (list, tuple)) else r[0]]
                           for s in rows for i, r in enumerate(s["resps"]))
    return out


def main(argv: list[str]) -> int:
    import torch
    torch.set_num_threads(1)  # the test machines' cores are shared with the JAX side
    import lm_eval
    from lm_eval.tasks import TaskManager
    spec = json.loads(argv[0])
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": spec["pretrained"], "dtype": "float32", "device": "cpu",
                                "max_length": spec["max_length"]},
        tasks=spec["tasks"], batch_size=spec.get("batch_size", 8), limit=spec.get("limit"), log_samples=True,
        bootstrap_iters=0, task_manager=TaskManager(include_path=spec["include_path"], include_defaults=False))
    results = {t: {k: v for k, v in r.items() if isinstance(v, (int, float, str))} for t, r in out["results"].items()}
    print(json.dumps({"results": results, "requests": requests_of(out["samples"])}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
