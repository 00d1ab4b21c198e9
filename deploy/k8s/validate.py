"""Validates rendered Kubernetes manifests (YAML on stdin, several documents)
offline: built-in kinds against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate, in strict mode (unknown fields are errors), and JobSet
and PodMonitor against the CRD schemas vendored in schemas/, made just as
strict. Prints one line per object; exits 1 if any is invalid.

usage: kubectl kustomize DIR | python validate.py [--k8s-version 1.32]
"""

import argparse
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
# (group/version, kind) -> vendored CRD (see schemas/README.md)
CRDS = {
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets-v0.12.0.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors-v0.93.0.yaml",
}


def strict(schema):
    """Makes an OpenAPI v3 CRD schema refuse unknown fields, as the API
    server's strict field validation does (pruning aside)."""
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for item in schema:
            strict(item)
    return schema


def crd_schema(file, version):
    crd = yaml.safe_load((HERE / "schemas" / file).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strict(v["schema"]["openAPIV3Schema"])
            # Object metadata is the API server's business, as for built-ins.
            schema["properties"]["metadata"] = {"type": "object"}
            schema["properties"]["apiVersion"] = {"type": "string"}
            schema["properties"]["kind"] = {"type": "string"}
            return schema
    raise SystemExit(f"{file} has no version {version}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k8s-version", default="1.32")
    args = parser.parse_args()
    failed = 0
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    if not docs:
        print("no objects to validate", file=sys.stderr)
        return 1
    for doc in docs:
        api, kind = doc.get("apiVersion", "?"), doc.get("kind", "?")
        name = f"{kind}/{doc.get('metadata', {}).get('name', '?')}"
        errors = []
        if (api, kind) in CRDS:
            schema = crd_schema(CRDS[(api, kind)], api.split("/")[1])
            validator = jsonschema.Draft7Validator(schema)
            for e in validator.iter_errors(doc):
                path = "/".join(str(p) for p in e.absolute_path)
                errors.append(f"{path}: {e.message}")
        else:
            try:
                kubernetes_validate.validate(doc, args.k8s_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                errors.append(f"{path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"no schema for {api} {kind}: {e}")
        if errors:
            failed += 1
            for err in errors:
                print(f"INVALID {name}: {err}")
        else:
            print(f"valid   {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
