"""`maxmodel launch tpu`: golden gcloud commands (printed with --dry-run), the TPU catalog, bad input."""
import shlex

import pytest

from maxmodel.launch import cli
from maxmodel.launch.catalog import tpu_slice
from maxmodel.launch.errors import LaunchError

WHERE = ["--zone", "us-east5-a", "--project", "my-proj"]
TWO_SLICES = ["--tpu-type", "v5p-256", "--slices", "2", "--name", "big", *WHERE]
# 2 slices x 128 chips: one copy of the model per slice, FSDP over each slice's chips.
TRAIN = ["train", "mesh.dcn.data=2", "mesh.data=1", "mesh.fsdp=-1", "run.output_dir=gs://bucket/runs",
         "run.name=big"]


def dry(capsys, action, *args) -> list[str]:
    assert cli.main(["tpu", action, "--dry-run", *args]) == 0
    return [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]


@pytest.fixture(autouse=True)
def no_gcloud_defaults(monkeypatch):
    monkeypatch.delenv("CLOUDSDK_COMPUTE_ZONE", raising=False)
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)


def test_catalog_v5p_256_is_128_chips_on_32_hosts():
    s = tpu_slice("v5p-256")
    assert (s.chips, s.hosts, s.chips_per_host, s.topology) == (128, 32, 4, "4x4x8")
    assert (s.family.gke_accelerator, s.gke_machine_type, s.family.runtime_version) == (
        "tpu-v5p-slice", "ct5p-hightpu-4t", "v2-alpha-tpuv5")


@pytest.mark.parametrize("name, chips, hosts, topology, machine", [
    ("v4-8", 4, 1, "2x2x1", "ct4p-hightpu-4t"),
    ("v4-32", 16, 4, "2x2x4", "ct4p-hightpu-4t"),
    ("v5litepod-8", 8, 1, "2x4", "ct5lp-hightpu-8t"),
    ("v5e-16", 16, 4, "4x4", "ct5lp-hightpu-4t"),
    ("v6e-256", 256, 64, "16x16", "ct6e-standard-4t"),
    ("v6e-1", 1, 1, "1x1", "ct6e-standard-1t"),
    ("v5p-12288", 6144, 1536, "16x16x24", "ct5p-hightpu-4t"),
])
def test_catalog_shapes(name, chips, hosts, topology, machine):
    s = tpu_slice(name)
    assert (s.chips, s.hosts, s.topology, s.gke_machine_type) == (chips, hosts, topology, machine)


@pytest.mark.parametrize("name", ["v5p-250", "v9-8", "v5p", "tpu-8"])
def test_catalog_rejects_unknown_types(name):
    with pytest.raises(LaunchError, match="unknown TPU type"):
        tpu_slice(name)


def test_create_two_slices_is_a_spot_queued_resource(capsys):
    assert dry(capsys, "create", *TWO_SLICES, "--spot") == [
        ("gcloud compute tpus queued-resources create big --zone=us-east5-a --project=my-proj "
        "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=big --spot")]


def test_create_single_slice(capsys):
    one = ["--tpu-type", "v5p-256", "--name", "one", *WHERE]
    assert dry(capsys, "create", *one, "--reserved") == [
        ("gcloud compute tpus tpu-vm create one --zone=us-east5-a --project=my-proj "
        "--accelerator-type=v5p-256 --version=v2-alpha-tpuv5 --reserved")]
    assert dry(capsys, "create", *one, "--queued") == [
        ("gcloud compute tpus queued-resources create one --zone=us-east5-a --project=my-proj "
        "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --node-id=one")]


def test_run_two_slices_sets_the_megascale_environment_on_all_workers(capsys):
    lines = dry(capsys, "run", *TWO_SLICES, "--", *TRAIN)
    assert lines[0] == ("gcloud compute tpus tpu-vm describe big-0 --zone=us-east5-a --project=my-proj "
                        "'--format=value(networkEndpoints[0].ipAddress)'")
    assert len(lines) == 3
    for slice_id, line in enumerate(lines[1:]):
        argv = shlex.split(line)
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", f"big-{slice_id}"]
        assert argv[6:9] == ["--zone=us-east5-a", "--project=my-proj", "--worker=all"]
        remote = argv[9].removeprefix("--command=")
        assert remote == (
            "mkdir -p ~/maxmodel-logs && (cd ~/maxmodel 2>/dev/null || cd ~) && "
            "MEGASCALE_COORDINATOR_ADDRESS=<IP of worker 0 of slice 0>:8080 MEGASCALE_NUM_SLICES=2 "
            f"MEGASCALE_SLICE_ID={slice_id} MEGASCALE_PORT=8080 setsid nohup ~/maxmodel-venv/bin/maxmodel "
            "train mesh.dcn.data=2 mesh.data=1 mesh.fsdp=-1 run.output_dir=gs://bucket/runs run.name=big "
            "> ~/maxmodel-logs/big.log 2>&1 < /dev/null &")


def test_setup_from_git_installs_on_every_worker_of_every_slice(capsys):
    lines = dry(capsys, "setup", *TWO_SLICES, "--git", "https://github.com/org/maxmodel@v0.1.0")
    assert len(lines) == 2
    for slice_id, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[5:9] == [f"big-{slice_id}", "--zone=us-east5-a", "--project=my-proj", "--worker=all"]
        assert argv[9] == ("--command=set -e && python3 -m pip install --user --quiet --upgrade uv && "
                           "~/.local/bin/uv venv --allow-existing --python 3.12 ~/maxmodel-venv && "
                           "~/.local/bin/uv pip install --python ~/maxmodel-venv/bin/python "
                           "'maxmodel[tpu] @ git+https://github.com/org/maxmodel@v0.1.0'")


def test_setup_copies_the_checkout_to_all_workers(capsys):
    lines = dry(capsys, "setup", *TWO_SLICES)
    assert lines[0].startswith("tar czf ") and "--exclude=.git" in lines[0]
    tarball = shlex.split(lines[0])[2]
    assert lines[1:3] == [f"gcloud compute tpus tpu-vm scp {tarball} 'big-{i}:~/maxmodel-src.tgz' "
                          "--zone=us-east5-a --project=my-proj --worker=all" for i in (0, 1)]
    assert all('uv pip install --python ~/maxmodel-venv/bin/python -e "$HOME/maxmodel[tpu]"' in line
               for line in lines[3:])


def test_logs_status_stop_delete(capsys):
    assert dry(capsys, "logs", *TWO_SLICES, "--slice", "1", "--worker", "3", "--follow") == [
        ("gcloud compute tpus tpu-vm ssh big-1 --zone=us-east5-a --project=my-proj --worker=3 "
        "'--command=tail -n 100 -f ~/maxmodel-logs/big.log'")]
    status = dry(capsys, "status", *TWO_SLICES)
    assert status[0] == "gcloud compute tpus queued-resources describe big --zone=us-east5-a --project=my-proj"
    stop = dry(capsys, "stop", *TWO_SLICES)
    assert [shlex.split(line)[-1] for line in stop] == [("--command=pkill -TERM -f '[m]axmodel-venv/bin/maxmodel' "
                                                        "|| true")] * 2
    assert dry(capsys, "delete", *TWO_SLICES) == [
        "gcloud compute tpus queued-resources delete big --zone=us-east5-a --project=my-proj --force --quiet"]
    assert dry(capsys, "delete", "--name", "one", *WHERE) == [
        "gcloud compute tpus tpu-vm delete one --zone=us-east5-a --project=my-proj --quiet"]


@pytest.mark.parametrize("args, named", [
    (["create", "--tpu-type", "v5p-250", "--name", "n", *WHERE], "v5p-250"),
    (["create", "--tpu-type", "v5p-256", "--name", "n", "--project", "p"], "--zone"),
    (["create", "--tpu-type", "v5p-256", "--name", "n", "--zone", "z"], "--project"),
    (["create", "--tpu-type", "v5p-256", *WHERE], "--name"),
    (["run", *TWO_SLICES, "--", "train", "mesh.dcn.data=3"], "mesh.dcn.data"),    # 3 across 2 slices
    (["run", *TWO_SLICES, "--", "train", "mesh.dcn.data=2", "mesh.data=1", "mesh.fsdp=64"], "mesh.fsdp"),
    (["run", *TWO_SLICES], "after --"),
    (["logs", *TWO_SLICES, "--slice", "2"], "--slice"),
])
def test_bad_input_exits_2_naming_it(args, named, capsys):
    assert cli.main(["tpu", args[0], "--dry-run", *args[1:]]) == 2
    assert named in capsys.readouterr().err


def test_gcloud_environment_supplies_project_and_zone(capsys, monkeypatch):
    monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", "europe-west4-a")
    monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "env-proj")
    assert dry(capsys, "delete", "--name", "one") == [
        "gcloud compute tpus tpu-vm delete one --zone=europe-west4-a --project=env-proj --quiet"]


def test_two_slices_without_mesh_arguments_put_data_across_slices(capsys):
    """mesh.dcn.data defaults to -1: the README's multi-slice example needs no mesh arguments."""
    from maxmodel.config import load_config
    from maxmodel.parallel.mesh import mesh_shape
    lines = dry(capsys, "run", *TWO_SLICES, "--", "train", "run.output_dir=gs://bucket/runs")
    assert len(lines) == 3 and all("maxmodel train run.output_dir=gs://bucket/runs >" in x for x in lines[1:])
    ici, dcn = mesh_shape(load_config().mesh, 2 * 128, num_slices=2)
    assert dcn == {"data": 2, "stage": 1, "fsdp": 1, "sequence": 1, "tensor": 1, "expert": 1}
    assert ici["data"] == 128
