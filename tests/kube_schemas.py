"""Check Kubernetes manifests against the API schemas, KubeRay's CRDs included, without a cluster.

- Kubernetes kinds (Deployment, Service, PersistentVolumeClaim, ...): the strict schemas that
  `kubernetes-validate` (PyPI) ships for each Kubernetes release; unknown fields are errors.
- KubeRay kinds (RayCluster, RayJob): the CRDs' `openAPIV3Schema` of KubeRay v1.7.0
  (`tests/fixtures/kuberay/`, where it says why they are vendored), read the way the API server's
  strict field validation reads it: unknown fields are errors, `nullable` allows null. Their
  `metadata` and every pod template in them are also checked against the Kubernetes schemas.
- CEL rules (`x-kubernetes-validations`) need the API server. A manifest that sets a field carrying
  one gets an error saying so (check it with `kubectl apply --dry-run=server`), never a silent pass.

    python -m tests.kube_schemas docker/kuberay/*.yaml [--kubernetes 1.30]

prints one line per problem (`FILE: Kind/name: field.path: message`) and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

CRD_DIR = Path(__file__).parent / "fixtures" / "kuberay"
KUBERAY_VERSION = "1.7.0"
CRDS = {("ray.io/v1", "RayCluster"): "ray.io_rayclusters_v1", ("ray.io/v1", "RayJob"): "ray.io_rayjobs_v1"}
DEFS_URI = "https://kubernetes.io/api/_definitions.json"


def kubernetes_versions() -> list[str]:
    """The Kubernetes releases `kubernetes-validate` has schemas for, oldest first ("1.25", ...)."""
    return sorted({kv.major_minor(v) for v in kv.all_versions()}, key=lambda v: tuple(map(int, v.split("."))))


def _openapi_to_jsonschema(schema: dict) -> dict:
    """A structural CRD schema as JSON Schema, with the API server's strict field validation."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _openapi_to_jsonschema(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _openapi_to_jsonschema(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _openapi_to_jsonschema(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_openapi_to_jsonschema(x) for x in s[key]]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict:
    """The vendored CRD schema, as stored (OpenAPI v3)."""
    with gzip.open(CRD_DIR / f"{CRDS[api_version, kind]}.json.gz") as f:
        return json.load(f)


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Validator:
    return jsonschema.Draft4Validator(_openapi_to_jsonschema(crd_schema(api_version, kind)))


@functools.cache
def _k8s_registry(version: str) -> Registry:
    """Every strict Kubernetes definition of one release, read once (the file is several MB)."""
    (schema_version,) = {v for v in kv.all_versions() if kv.major_minor(v) == version}
    defs = kv.schema_contents(
        f"kubernetes-json-schema/v{schema_version}-local-strict/_definitions.json", version
    )
    return Resource.from_contents(defs) @ Registry()


@functools.cache
def _k8s_definition_validator(version: str, definition: str) -> jsonschema.Validator:
    """A validator for one strict Kubernetes definition, e.g. io.k8s.api.core.v1.PodTemplateSpec."""
    return jsonschema.Draft202012Validator(
        {"$ref": f"{DEFS_URI}#/$defs/{definition}"}, registry=_k8s_registry(version)
    )


def _path(prefix: tuple, error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in (*prefix, *error.absolute_path)) or "(document)"


def _errors(validator: jsonschema.Validator, value, prefix: tuple = ()) -> list[str]:
    found = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_path(prefix, e)}: {e.message}" for e in found]


def _cel_fields(schema: dict, value, path: tuple):
    """The fields the manifest sets whose schema carries CEL rules, with the rules."""
    if "x-kubernetes-validations" in schema:
        yield path, [rule["rule"] for rule in schema["x-kubernetes-validations"]]
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else None)
            if sub_schema is not None:
                yield from _cel_fields(sub_schema, sub, (*path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from _cel_fields(schema["items"], sub, (*path, i))


def _pod_templates(kind: str, spec: dict):
    """(path, template) of every pod template in a RayCluster's or RayJob's spec."""
    clusters = [(("spec",), spec)] if kind == "RayCluster" else []
    if kind == "RayJob":
        if "rayClusterSpec" in spec:
            clusters.append((("spec", "rayClusterSpec"), spec["rayClusterSpec"]))
        if "submitterPodTemplate" in spec:
            yield ("spec", "submitterPodTemplate"), spec["submitterPodTemplate"]
    for prefix, cluster in clusters:
        if isinstance(cluster.get("headGroupSpec"), dict) and "template" in cluster["headGroupSpec"]:
            yield (*prefix, "headGroupSpec", "template"), cluster["headGroupSpec"]["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            if isinstance(group, dict) and "template" in group:
                yield (*prefix, "workerGroupSpecs", i, "template"), group["template"]


def validate_document(doc, kubernetes: str) -> list[str]:
    """Problems with one manifest document, as `field.path: message` lines (empty when valid)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["(document): not a Kubernetes object (no apiVersion and kind)"]
    api_version, kind = doc["apiVersion"], doc["kind"]
    if (api_version, kind) in CRDS:
        problems = _errors(_crd_validator(api_version, kind), doc)
        meta = _k8s_definition_validator(kubernetes, "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
        problems += _errors(meta, doc.get("metadata", {}), ("metadata",))
        pod = _k8s_definition_validator(kubernetes, "io.k8s.api.core.v1.PodTemplateSpec")
        if isinstance(doc.get("spec"), dict):
            for prefix, template in _pod_templates(kind, doc["spec"]):
                problems += [f"{p} (Kubernetes {kubernetes})" for p in _errors(pod, template, prefix)]
        for path, rules in _cel_fields(crd_schema(api_version, kind), doc, ()):
            problems.append(
                f"{'.'.join(map(str, path))}: carries CEL rules this check cannot evaluate"
                f" ({'; '.join(rules)}); check it with `kubectl apply --dry-run=server`"
            )
        return problems
    try:
        kubernetes_validate.validate(doc, kubernetes, strict=True)
    except kv.ValidationError as e:
        return [f"{_path((), e)}: {e.message} (Kubernetes {e.version})"]
    except kv.SchemaNotFoundError:
        return [
            f"(document): no schema for {kind} {api_version} in Kubernetes {kubernetes}"
            f" or KubeRay {KUBERAY_VERSION}"
        ]
    return []


def validate_file(path: Path, kubernetes: str) -> list[str]:
    """Problems with every document of a manifest file, as `FILE: Kind/name: field.path: message`."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: cannot read it as YAML: {e}".replace("\n", " ")]
    problems = []
    for i, doc in enumerate(docs):
        name = (
            f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            if isinstance(doc, dict)
            else f"#{i}"
        )
        problems += [f"{path}: {name}: {p}" for p in validate_document(doc, kubernetes)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kube_schemas", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument(
        "--kubernetes",
        action="append",
        choices=kubernetes_versions(),
        help="Kubernetes release to check against (repeatable; default: the oldest and newest shipped)",
    )
    args = parser.parse_args(argv)
    versions = args.kubernetes or [kubernetes_versions()[0], kubernetes_versions()[-1]]
    problems = [p for f in args.files for v in versions for p in validate_file(f, v)]
    for line in dict.fromkeys(problems):
        print(line)
    if not problems:
        print(
            f"{len(args.files)} file(s) valid against Kubernetes {', '.join(versions)}"
            f" and KubeRay {KUBERAY_VERSION}"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
