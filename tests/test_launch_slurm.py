"""`maxmodel launch slurm`: the sbatch script for 4 nodes x 8 GPUs; bad input."""
import shutil
import subprocess

import pytest

from maxmodel.launch import cli

TRAIN = ["train", "mesh.data=4", "mesh.fsdp=8", "run.output_dir=/shared/runs", "run.name=big"]


def render(capsys, *args) -> list[str]:
    assert cli.main(["slurm", "--dry-run", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_four_nodes_of_eight_gpus_one_process_per_gpu(capsys, tmp_path):
    lines = render(capsys, "--nodes", "4", "--gpus-per-node", "8", "--name", "big", "--partition", "a100",
                   "--time", "24:00:00", "--requeue", "--setup", "source /shared/venv/bin/activate", "--", *TRAIN)
    assert lines[0] == "#!/bin/bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=big", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --output=%x-%j.out",
                      "#SBATCH --signal=TERM@120", "#SBATCH --partition=a100", "#SBATCH --time=24:00:00",
                      "#SBATCH --requeue"]
    body = [line for line in lines if not line.startswith("#")]
    assert body == ["set -euo pipefail", "source /shared/venv/bin/activate", "export JAX_PLATFORMS=cuda",
                    ("srun --kill-on-bad-exit=1 python -m maxmodel.cli train mesh.data=4 mesh.fsdp=8 "
                    "run.output_dir=/shared/runs run.name=big")]
    if shutil.which("bash"):
        script = tmp_path / "big.sbatch"
        script.write_text("\n".join(lines) + "\n")
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_one_process_per_node_sees_all_its_gpus(capsys):
    lines = render(capsys, "--nodes", "4", "--gpus-per-node", "8", "--per", "node", "--", *TRAIN)
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines


@pytest.mark.parametrize("args, named", [
    (["--gpus-per-node", "8", "--", "train"], "--nodes"),
    (["--nodes", "4", "--", "train"], "--gpus-per-node"),
    (["--nodes", "4", "--gpus-per-node", "8", "--", "train", "mesh.data=16"], "mesh.data"),
    (["--nodes", "4", "--gpus-per-node", "8"], "after --"),
])
def test_bad_input_exits_2_naming_it(args, named, capsys):
    assert cli.main(["slurm", "--dry-run", *args]) == 2
    assert named in capsys.readouterr().err
