"""What a container's spec asks for, resolved the way a kubelet would: its argv (``command``/``args`` with
``$(VAR)`` expansion, the executable found on PATH), its capabilities, and its environment (``env``,
``envFrom``, fieldRefs, Secrets and ConfigMaps read from the API)."""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Mapping, Sequence

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from .errors import ContainerConfigError, StartError
from .kubewatch import API_TIMEOUT_S, Obj, read_json

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # after the kubelet's own path
_REFERENCE = re.compile(r"\$\$|\$\(([^)]*)\)")
_FIELD_INDEX = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, unknown ones kept, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


def container_command(container: Obj, entrypoint: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The argv of a container: ``command`` (else the image's entry point) followed by ``args``."""
    command = container.get("command") or list(entrypoint)
    argv = [expand(str(a), env) for a in [*command, *(container.get("args") or [])]]
    if not argv:
        raise StartError(
            f"container {container.get('name')} has neither command nor args, and image {container.get('image')} "
            "has no entry point here: set command in the pod spec, or pass entrypoints= to MiniKubelet"
        )
    return argv


def resolve_executable(name: str, search_path: str) -> str:
    """What ``execvp`` would run for ``name``, or StartError in Kubernetes' words."""
    found = name if "/" in name and os.access(name, os.X_OK) else shutil.which(name, path=search_path)
    if not found:
        raise StartError(f'exec: "{name}": executable file not found in $PATH ({search_path})')
    return found


def capabilities(container: Obj) -> list[str]:
    """The capabilities a container gets, as setpriv names them: ``add`` only (no runtime defaults)."""
    context = container.get("securityContext") or {}
    if context.get("privileged"):
        return ["all"]
    added = (context.get("capabilities") or {}).get("add") or []
    return sorted({str(c).lower().removeprefix("cap_") for c in added})


def container_env(
    core: kubernetes.client.CoreV1Api, pod: Obj, container: Obj, base: Mapping[str, str], fields: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment: ``base``, then envFrom, then env in order (``$(VAR)`` expanded against what
    comes before; ``fields`` answers fieldRefs). ContainerConfigError when a Secret or ConfigMap is missing."""
    namespace = str(pod["metadata"]["namespace"])
    env = dict(base)
    for source in container.get("envFrom") or []:
        for kind in ("secretRef", "configMapRef"):
            if ref := source.get(kind):
                data = _object_data(core, kind, namespace, ref["name"], bool(ref.get("optional")))
                env.update({f"{source.get('prefix') or ''}{k}": v for k, v in data.items()})
    for var in container.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand(str(var.get("value") or ""), env)
        elif (value := _value_from(core, var["valueFrom"], pod, fields)) is not None:
            env[var["name"]] = value
    return env


def pod_fields(pod: Obj, node_name: str, pod_ips: Sequence[str], host_ips: Sequence[str]) -> dict[str, str]:
    """The fields a fieldRef may name (labels and annotations aside), for a pod running on ``node_name``."""
    meta, spec = pod["metadata"], pod["spec"]
    return {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": pod_ips[0],
        "status.podIPs": ",".join(pod_ips),
        "status.hostIP": host_ips[0],
        "status.hostIPs": ",".join(host_ips),
    }


def _value_from(core: kubernetes.client.CoreV1Api, source: Obj, pod: Obj, fields: Mapping[str, str]) -> str | None:
    namespace = str(pod["metadata"]["namespace"])
    if ref := source.get("fieldRef"):
        path = str(ref["fieldPath"])
        if match := _FIELD_INDEX.fullmatch(path):
            return str((pod["metadata"].get(match.group(1)) or {}).get(match.group(2), ""))
        if path not in fields:
            raise ContainerConfigError(f"fieldRef {path} is not supported by the mini kubelet")
        return fields[path]
    for kind, ref_kind in (("secretKeyRef", "secretRef"), ("configMapKeyRef", "configMapRef")):
        if ref := source.get(kind):
            optional = bool(ref.get("optional"))
            data = _object_data(core, ref_kind, namespace, ref["name"], optional)
            if ref["key"] not in data and not optional:
                what = "secret" if kind == "secretKeyRef" else "configmap"
                raise ContainerConfigError(f"couldn't find key {ref['key']} in {what} {namespace}/{ref['name']}")
            return data.get(ref["key"])
    raise ContainerConfigError(f"valueFrom {sorted(source)} is not supported by the mini kubelet")


def _object_data(
    core: kubernetes.client.CoreV1Api, kind: str, namespace: str, name: str, optional: bool
) -> dict[str, str]:
    """The data of a Secret (decoded) or ConfigMap; {} for a missing optional one."""
    read = core.read_namespaced_secret if kind == "secretRef" else core.read_namespaced_config_map
    try:
        obj = read_json(read(name, namespace, _preload_content=False, _request_timeout=API_TIMEOUT_S))
    except ApiException as exc:
        if exc.status == 404 and optional:
            return {}
        what = "secret" if kind == "secretRef" else "configmap"
        raise ContainerConfigError(f'{what} "{name}" not found ({exc.status} {exc.reason})') from None
    data = obj.get("data") or {}
    if kind == "secretRef":
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
    return {k: str(v) for k, v in data.items()}
