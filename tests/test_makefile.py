"""`make train` installs only maxmodel's own dependencies, and they are enough to train the default model;
`make test` installs every extra the suite uses."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level modules that come only with an extra (or the separate Hugging Face venv).
EXTRA_ONLY = ("tensorflow", "seqio", "libtpu", "safetensors", "pytest", "xdist", "nbclient", "ipykernel",
              "transformers", "torch", "lm_eval", "sacrebleu", "rouge_score")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def pip_installs(target: str, tmp_path: Path) -> list[str]:
    """The `pip install -e` lines `make -n TARGET` would run on a fresh venv (nothing is installed)."""
    out = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}", f"HF_VENV={tmp_path / 'hf'}"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line for line in out.splitlines() if re.search(r"pip install .*-e ", line)]


def test_make_train_installs_no_extra(tmp_path):
    assert [line.split("pip install", 1)[1].strip() for line in pip_installs("train", tmp_path)] == ["-q -e ."]
    deps = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]).lower()
    for name in ("tensorflow", "seqio", "libtpu", "jax[tpu]", "pytest", "torch", "transformers"):
        assert name not in deps, name


def test_make_test_installs_every_extra_the_suite_uses(tmp_path):
    extras = set()
    for line in pip_installs("test", tmp_path):
        extras |= set(m.group(1).split(",")) if (m := re.search(r"-e '\.\[([^]]+)\]'", line)) else set()
    assert {"dev", "tpu", "seqio", "interop"} <= extras


def test_the_default_model_trains_without_any_extra(tmp_path):
    """As in a venv from `make train`: the extras' modules cannot be imported (a finder refuses them)."""
    blocker = f"""
import sys
BLOCKED = {EXTRA_ONLY!r}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed by make train)")
sys.meta_path.insert(0, Refuse())
from maxmodel.cli import main
sys.exit(main(sys.argv[1:]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", blocker, "train", "train.steps=2", "run.progress=false",
                          "run.cpu_devices=8", f"run.output_dir={tmp_path}", "checkpoint.enabled=false"],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sample (greedy): The " in out.stdout
