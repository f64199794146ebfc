#!/usr/bin/env python3
"""Validates a chart rendering (the JSON that tests/helm/render prints).

- the merged values against the chart's values.schema.json (as helm does at
  install), and
- every manifest against the Kubernetes OpenAPI schemas of each version given,
  strictly (unknown fields are errors), with PyPI's kubernetes-validate;
  ServiceMonitor and PrometheusRule, CRDs those schemas lack, against the
  fields the Prometheus Operator requires.

Usage: validate.py SCHEMA.json RENDERED.json K8S_VERSION...
Prints one line per problem and exits 1 if there was any.
"""
import json
import sys

import jsonschema
import kubernetes_validate


def service_monitor_problems(obj):
    spec = obj.get("spec", {})
    problems = []
    if not isinstance(spec.get("selector"), dict):
        problems.append("spec.selector must be a label selector")
    endpoints = spec.get("endpoints")
    if not endpoints or not all(isinstance(e, dict) and "port" in e for e in endpoints):
        problems.append("spec.endpoints must name a port")
    return problems


def prometheus_rule_problems(obj):
    groups = obj.get("spec", {}).get("groups")
    problems = []
    if not groups:
        return ["spec.groups must list rule groups"]
    for g in groups:
        if not g.get("name"):
            problems.append("every group needs a name")
        for r in g.get("rules") or []:
            if not (r.get("alert") or r.get("record")) or not isinstance(r.get("expr"), str):
                problems.append(f"rule {r}: needs alert (or record) and expr")
            for k, v in (r.get("labels") or {}).items():
                if not isinstance(v, str):
                    problems.append(f"rule {r.get('alert')}: label {k} must be a string")
            for k, v in (r.get("annotations") or {}).items():
                if not isinstance(v, str):
                    problems.append(f"rule {r.get('alert')}: annotation {k} must be a string")
    return problems


CRD_CHECKS = {"ServiceMonitor": service_monitor_problems, "PrometheusRule": prometheus_rule_problems}


def main():
    schema_path, rendered_path, versions = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(schema_path) as f:
        schema = json.load(f)
    with open(rendered_path) as f:
        rendered = json.load(f)
    problems = []
    validator = jsonschema.Draft7Validator(schema)
    for err in sorted(validator.iter_errors(rendered["values"]), key=str):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        problems.append(f"values.schema.json: {where}: {err.message}")
    for m in rendered["manifests"]:
        obj = m["object"]
        name = f'{m["template"]}: {obj.get("kind")}/{obj.get("metadata", {}).get("name")}'
        if obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            check = CRD_CHECKS.get(obj.get("kind"))
            if check is None:
                problems.append(f"{name}: no check for this kind")
            else:
                problems += [f"{name}: {p}" for p in check(obj)]
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{name}: Kubernetes {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{name}: Kubernetes {version}: no schema: {e}")
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
