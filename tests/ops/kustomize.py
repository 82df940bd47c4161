"""A small Kustomize renderer for the features ops/k8s uses, so CI can render the manifests with
no kubectl and no network. Anything else in a kustomization is refused, never skipped, and
tests/ops/test_k8s.py compares the output with `kubectl kustomize` wherever kubectl exists.

Supported: ``resources`` (files and directories), ``components``, ``namespace``, ``images``
(name, newName, newTag, digest), ``replicas`` and ``patches`` holding JSON 6902 operations
(add, replace, remove) on one ``target`` kind and name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "images",
    "replicas",
    "patches",
}
# The kinds ops/k8s may hold, and whether they live in a namespace.
NAMESPACED = {
    "ConfigMap": True,
    "Secret": True,
    "Service": True,
    "Deployment": True,
    "Job": True,
    "PodDisruptionBudget": True,
    "Namespace": False,
}
_WORKLOADS = {"Deployment", "Job"}


class RenderError(ValueError):
    """A kustomization uses something this renderer does not implement, or is wrong."""


def render(directory: Path) -> list[dict[str, Any]]:
    """The manifests ``kubectl kustomize DIRECTORY`` prints, in resource order."""
    return _build(directory, expect_kind="Kustomization")


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _build(directory: Path, expect_kind: str) -> list[dict[str, Any]]:
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise RenderError(f"{directory}: no {KUSTOMIZATION}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise RenderError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    if spec.get("kind", "Kustomization") != expect_kind:
        raise RenderError(f"{path}: kind {spec.get('kind')!r}, expected {expect_kind}")

    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            objects.extend(_build(target, expect_kind="Kustomization"))
        elif target.is_file():
            objects.extend(load_documents(target))
        else:
            raise RenderError(f"{path}: resource {entry} does not exist")
    for entry in spec.get("components", []):
        objects = _apply_component(directory / entry, objects)
    _check_unique(objects, path)
    return _transform(spec, objects, path)


def _apply_component(directory: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A component's resources join the parent's; its transformers then apply to all of them.
    return objects + _build(directory, expect_kind="Component")


def _transform(
    spec: dict[str, Any], objects: list[dict[str, Any]], path: Path
) -> list[dict[str, Any]]:
    objects = copy.deepcopy(objects)
    for patch in spec.get("patches", []):
        _patch(objects, patch, path)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in NAMESPACED:
                raise RenderError(f"{path}: unknown kind {obj['kind']}")
            if NAMESPACED[obj["kind"]]:
                obj["metadata"]["namespace"] = spec["namespace"]
    for replica in spec.get("replicas", []):
        matched = [o for o in objects if o["kind"] == "Deployment" and _name(o) == replica["name"]]
        if not matched:
            raise RenderError(f"{path}: replicas: no Deployment {replica['name']}")
        for obj in matched:
            obj["spec"]["replicas"] = replica["count"]
    for image in spec.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                container["image"] = _retag(container["image"], image)
    return objects


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def _check_unique(objects: list[dict[str, Any]], path: Path) -> None:
    seen = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace"), _name(obj))
        if key in seen:
            raise RenderError(f"{path}: {key} defined twice")
        seen.add(key)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] not in _WORKLOADS:
        return []
    pod = obj["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _retag(reference: str, image: dict[str, Any]) -> str:
    name, tag, digest = _split_image(reference)
    if name != image["name"]:
        return reference
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _split_image(reference: str) -> tuple[str, str | None, str | None]:
    rest, _, digest = reference.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest or None
    return rest, None, digest or None


def _patch(objects: list[dict[str, Any]], patch: dict[str, Any], path: Path) -> None:
    if set(patch) != {"path", "target"} or set(patch["target"]) != {"kind", "name"}:
        raise RenderError(f"{path}: a patch needs exactly `path` and a `target` kind and name")
    operations = yaml.safe_load((path.parent / patch["path"]).read_text())
    if not isinstance(operations, list):
        raise RenderError(f"{path}: {patch['path']} is not a list of JSON 6902 operations")
    target = patch["target"]
    matched = [o for o in objects if o["kind"] == target["kind"] and _name(o) == target["name"]]
    if not matched:
        raise RenderError(f"{path}: patch target {target} matches nothing")
    for obj in matched:
        for operation in operations:
            _json6902(obj, operation, path)


def _json6902(obj: dict[str, Any], operation: dict[str, Any], path: Path) -> None:
    op = operation["op"]
    if op not in {"add", "replace", "remove"}:
        raise RenderError(f"{path}: JSON 6902 op {op!r} is not implemented")
    *parents, last = [
        p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]
    ]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, operation["value"])
        elif op == "replace":
            node[index] = operation["value"]
        else:
            del node[index]
        return
    if op != "add" and last not in node:
        raise RenderError(f"{path}: {op} of {operation['path']}: no such field")
    if op == "remove":
        del node[last]
    else:
        node[last] = operation["value"]
