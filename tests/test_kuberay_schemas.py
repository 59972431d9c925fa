"""docker/kuberay/*.yaml against the Kubernetes API schemas and KubeRay's CRD schemas (tests/kube_schemas.py).

No cluster: `kubernetes-validate`'s strict schemas for every Kubernetes release it ships, and the
vendored KubeRay v1.7.0 CRDs (tests/fixtures/kuberay/README.md says where they come from and why).
"""

import copy
from pathlib import Path

import pytest
import yaml

from tests import kube_schemas

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "docker" / "kuberay").glob("*.yaml"))


def _doc(kind: str) -> dict:
    for f in MANIFESTS:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc["kind"] == kind:
                return copy.deepcopy(doc)
    raise AssertionError(f"no {kind} in docker/kuberay/")


def test_every_manifest_is_checked_by_a_schema():
    kinds = {d["kind"] for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d}
    assert kinds == {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"}
    assert [f.name for f in MANIFESTS] == ["mlflow.yaml", "raycluster.yaml", "rayjob.yaml", "storage.yaml"]


@pytest.mark.parametrize("kubernetes", kube_schemas.kubernetes_versions())
def test_the_shipped_manifests_are_valid(kubernetes):
    for f in MANIFESTS:
        assert kube_schemas.validate_file(f, kubernetes) == [], f


def test_the_vendored_crds_are_kuberays_v1_schemas():
    for (api_version, kind), stem in kube_schemas.CRDS.items():
        assert (kube_schemas.CRD_DIR / f"{stem}.json.gz").is_file(), stem
        schema = kube_schemas.crd_schema(api_version, kind)
        assert api_version == "ray.io/v1"
        assert {"apiVersion", "kind", "metadata", "spec", "status"} <= set(schema["properties"]), kind
    cluster = kube_schemas.crd_schema("ray.io/v1", "RayCluster")["properties"]["spec"]["properties"]
    # the pod templates are expanded in the CRD, so their fields are checked too
    head = cluster["headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]
    assert "containers" in head and "volumes" in head


def _parent(doc: dict, path: str):
    """The node holding the last key of a dotted path ("spec.workerGroupSpecs.0.groupName"), and that key."""
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, last


def _set(doc: dict, path: str, value) -> dict:
    node, last = _parent(doc, path)
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


def _rename(doc: dict, path: str, new: str) -> dict:
    node, last = _parent(doc, path)
    node[new] = node.pop(last)
    return doc


_DELETE = object()
WORKER = "spec.workerGroupSpecs.0"
HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers.0"

# (kind, how the manifest is broken, a problem line the check must print: its start and some text)
BROKEN = {
    "a misspelt RayCluster field": (
        "RayCluster",
        lambda d: _rename(d, "spec.workerGroupSpecs", "workerGroupSpec"),
        ("spec: ", "'workerGroupSpec' was unexpected"),
    ),
    "replicas as a string": (
        "RayCluster",
        lambda d: _set(d, f"{WORKER}.replicas", "2"),
        (f"{WORKER}.replicas: ", "is not of type 'integer'"),
    ),
    "a quantity Kubernetes cannot parse": (
        "RayCluster",
        lambda d: _set(d, f"{WORKER}.template.spec.containers.0.resources.requests.memory", "48 GB"),
        (f"{WORKER}.template.spec.containers.0.resources.requests.memory: ", "does not match"),
    ),
    "a misspelt container field (the CRD's copy of the pod schema)": (
        "RayCluster",
        lambda d: _rename(d, f"{HEAD_CONTAINER}.imagePullPolicy", "imagePulPolicy"),
        (f"{HEAD_CONTAINER}: ", "'imagePulPolicy' was unexpected"),
    ),
    "a misspelt container field (Kubernetes' own pod schema)": (
        "RayCluster",
        lambda d: _rename(d, f"{HEAD_CONTAINER}.imagePullPolicy", "imagePulPolicy"),
        (f"{HEAD_CONTAINER}: ", "(Kubernetes 1.37)"),
    ),
    "a container without a name": (
        "RayCluster",
        lambda d: _set(d, f"{WORKER}.template.spec.containers.0.name", _DELETE),
        (f"{WORKER}.template.spec.containers.0: ", "'name' is a required property"),
    ),
    "a misspelt metadata field": (
        "RayCluster",
        lambda d: _rename(d, "metadata.labels", "label"),
        ("metadata: ", "'label' was unexpected"),
    ),
    "a worker group without a name": (
        "RayCluster",
        lambda d: _set(d, f"{WORKER}.groupName", _DELETE),
        (f"{WORKER}: ", "'groupName' is a required property"),
    ),
    "a misspelt RayJob field": (
        "RayJob",
        lambda d: _rename(d, "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        ("spec: ", "'shutdownAfterJobFinish' was unexpected"),
    ),
    "a field only the API server's CEL rules check": (
        "RayJob",
        lambda d: _set(d, "spec.managedBy", "ray.io/kuberay-operator"),
        ("spec.managedBy: ", "kubectl apply --dry-run=server"),
    ),
    "a misspelt Deployment field": (
        "Deployment",
        lambda d: _rename(d, "spec.replicas", "replica"),
        ("spec: ", "'replica' was unexpected"),
    ),
    "a Service port as a string": (
        "Service",
        lambda d: _set(d, "spec.ports.0.port", "5000"),
        ("spec.ports.0.port: ", "is not of type 'integer'"),
    ),
    "access modes as one string": (
        "PersistentVolumeClaim",
        lambda d: _set(d, "spec.accessModes", "ReadWriteMany"),
        ("spec.accessModes: ", "is not of type 'array'"),
    ),
    "a kind no schema knows": (
        "Service",
        lambda d: _set(d, "kind", "Sevice"),
        ("(document): ", "no schema for Sevice v1"),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_is_refused_naming_the_field(case):
    kind, breaks, (start, text) = BROKEN[case]
    assert kube_schemas.validate_document(_doc(kind), "1.37") == []
    problems = kube_schemas.validate_document(breaks(_doc(kind)), "1.37")
    assert any(p.startswith(start) and text in p for p in problems), problems


def test_the_command_names_the_file_and_object_and_exits_1(tmp_path, capsys):
    good = ROOT / "docker" / "kuberay" / "raycluster.yaml"
    assert kube_schemas.main([str(good)]) == 0
    assert "1 file(s) valid against Kubernetes 1.25, 1.37 and KubeRay 1.7.0" in capsys.readouterr().out

    bad = tmp_path / "raycluster.yaml"
    bad.write_text(yaml.safe_dump(_set(_doc("RayCluster"), f"{WORKER}.replicas", "2")))
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("spec: [unclosed\n")
    assert kube_schemas.main([str(bad), str(not_yaml), "--kubernetes", "1.30"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{bad}: RayCluster/cxr-sweeps: {WORKER}.replicas: '2' is not of type 'integer'"
    assert lines[-1].startswith(f"{not_yaml}: cannot read it as YAML: ")
    assert len(lines) == 2
