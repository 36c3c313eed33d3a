"""`maxmodel launch gke`: the rendered JobSet, parsed as YAML, for a v5p-256 2-slice job; bad input."""
import pytest
import yaml

from maxmodel.launch import cli

BASE = ["--tpu-type", "v5p-256", "--name", "big", "--image", "us-docker.pkg.dev/p/r/maxmodel:1"]
TRAIN = ["train", "mesh.dcn.data=2", "mesh.data=1", "mesh.fsdp=128", "run.output_dir=gs://bucket/runs"]


def render(capsys, *args) -> dict:
    assert cli.main(["gke", "--dry-run", *args]) == 0
    captured = capsys.readouterr()
    assert "+ kubectl apply -f big.yaml" in captured.err
    return yaml.safe_load(captured.out)


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_two_slice_v5p_256_jobset(capsys):
    doc = render(capsys, *BASE, "--slices", "2", "--", *TRAIN)
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet", "big")
    assert doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == \
        "cloud.google.com/gke-nodepool"
    [job] = doc["spec"]["replicatedJobs"]
    assert job["replicas"] == 2                      # one Job per slice
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 32       # 128 chips / 4 per host
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x8"}
    [container] = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"] == ["maxmodel", *TRAIN]
    env = env_of(container)
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "big-slice-0-0.big"
    assert env["MEGASCALE_NUM_SLICES"] == "2"
    assert env["MEGASCALE_SLICE_ID"] == {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
    assert env["MAXMODEL_HOSTS_PER_JOB"] == "32" and env["MAXMODEL_NUM_JOBS"] == "2"


def test_single_slice_has_no_megascale_and_spot_selects_spot_nodes(capsys):
    doc = render(capsys, "--tpu-type", "v5litepod-16", "--name", "big", "--image", "img", "--spot", "--",
                 "train", "mesh.data=-1")
    [job] = doc["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["replicas"] == 1 and job["template"]["spec"]["completions"] == 4
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert not any(k.startswith("MEGASCALE") for k in env_of(pod["containers"][0]))


def test_output_file_holds_the_same_manifest(capsys, tmp_path):
    path = tmp_path / "big.yaml"
    assert cli.main(["gke", "--dry-run", "--output", str(path), *BASE, "--", "train"]) == 0
    assert yaml.safe_load(path.read_text()) == yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("args, named", [
    (["--tpu-type", "v5x-8", "--name", "n", "--image", "i", "--", "train"], "v5x-8"),
    (["--tpu-type", "v5p-8", "--name", "Bad_Name", "--image", "i", "--", "train"], "--name"),
    (["--tpu-type", "v5p-8", "--name", "n", "--", "train"], "--image"),
    (["--tpu-type", "v5p-256", "--slices", "2", "--name", "n", "--image", "i", "--", "train",
      "mesh.dcn.data=2", "mesh.data=1", "mesh.tensor=3"], "mesh.tensor"),
])
def test_bad_input_exits_2_naming_it(args, named, capsys):
    assert cli.main(["gke", "--dry-run", *args]) == 2
    assert named in capsys.readouterr().err


def test_two_slices_without_mesh_arguments(capsys):
    """mesh.dcn.data=-1 by default fills the slices, so `-- train` alone renders (one Job per slice)."""
    doc = render(capsys, *BASE, "--slices", "2", "--", "train", "run.output_dir=gs://bucket/runs")
    [job] = doc["spec"]["replicatedJobs"]
    [container] = job["template"]["spec"]["template"]["spec"]["containers"]
    assert job["replicas"] == 2 and container["command"] == ["maxmodel", "train", "run.output_dir=gs://bucket/runs"]
