"""The CLI's way into a cluster: Workflows and AgentPools through the API server, with the
credentials, context and namespace kubectl would use, and the logs of agents that run as pods.
Every error is an AgentainerError that says what was asked and why it failed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from controller.backends.kubernetes import api_client
from controller.errors import AgentainerError, ConfigError, ConflictError, NotFoundError
from controller.models import API_GROUP, API_VERSION

WORKFLOWS = "workflows"
AGENT_POOLS = "agentpools"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REQUEST_TIMEOUT_SECONDS = 30


class ClusterError(AgentainerError):
    """The API server could not be reached, or refused a request."""


@dataclass
class Target:
    """Which cluster and namespace, as kubectl's flags say them."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False


class Cluster:
    """Our resources in one cluster, and the pods of their agents."""

    def __init__(self, target: Target) -> None:
        self.api_client, default_namespace, self.where = _connect(target)
        self.namespace = target.namespace or default_namespace
        self.all_namespaces = target.all_namespaces
        self.objects = kubernetes.client.CustomObjectsApi(self.api_client)
        self.core = kubernetes.client.CoreV1Api(self.api_client)

    def _call(self, action: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, _request_timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)
        except kubernetes.client.ApiException as error:
            raise _api_error(action, error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ClusterError(f"{action}: cannot reach the API server of {self.where}: "
                               f"{error}") from None

    # --- resources ------------------------------------------------------------------------------

    def create(self, body: dict[str, Any], plural: str = WORKFLOWS) -> dict[str, Any]:
        namespace = body.get("metadata", {}).get("namespace") or self.namespace
        name = body.get("metadata", {}).get("name") or body.get("metadata", {}).get(
            "generateName", "")
        result: dict[str, Any] = self._call(
            f"creating {plural}/{name} in {namespace}",
            self.objects.create_namespaced_custom_object, API_GROUP, API_VERSION, namespace,
            plural, body)
        return result

    def get(self, name: str, plural: str = WORKFLOWS) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            f"reading {plural}/{name} in {self.namespace}",
            self.objects.get_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace,
            plural, name)
        return result

    def all(self, plural: str = WORKFLOWS) -> list[dict[str, Any]]:
        if self.all_namespaces:
            found = self._call(f"listing {plural}", self.objects.list_cluster_custom_object,
                               API_GROUP, API_VERSION, plural)
        else:
            found = self._call(f"listing {plural} in {self.namespace}",
                               self.objects.list_namespaced_custom_object, API_GROUP,
                               API_VERSION, self.namespace, plural)
        items: list[dict[str, Any]] = found.get("items", [])
        return items

    def patch(self, name: str, patch: dict[str, Any], plural: str = WORKFLOWS) -> dict[str, Any]:
        """A merge patch of the resource (its spec or metadata)."""
        result: dict[str, Any] = self._call(
            f"changing {plural}/{name} in {self.namespace}",
            self.objects.patch_namespaced_custom_object, API_GROUP, API_VERSION,
            self.namespace, plural, name, patch)
        return result

    def delete(self, name: str, plural: str = WORKFLOWS) -> None:
        self._call(f"deleting {plural}/{name} in {self.namespace}",
                   self.objects.delete_namespaced_custom_object, API_GROUP, API_VERSION,
                   self.namespace, plural, name)

    def watch(self, name: str, seconds: float) -> Iterator[dict[str, Any]]:
        """The Workflow as it is now, then each time it changes, for up to ``seconds``; ends
        early when it is deleted (NotFoundError)."""
        deadline = time.monotonic() + seconds
        body = self.get(name)
        yield body
        version = body["metadata"].get("resourceVersion")
        while (left := deadline - time.monotonic()) > 0:
            stream = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in stream.stream(  # type: ignore[no-untyped-call]
                        self.objects.list_namespaced_custom_object, API_GROUP, API_VERSION,
                        self.namespace, WORKFLOWS, field_selector=f"metadata.name={name}",
                        resource_version=version, timeout_seconds=max(1, int(min(left, 60))),
                        _request_timeout=min(left, 60) + 10):
                    if event["type"] == "DELETED":
                        raise NotFoundError(f"workflow {name} was deleted")
                    if event["type"] == "ERROR":  # our version is too old: read it afresh
                        version = None
                        break
                    body = event["object"]
                    version = body["metadata"].get("resourceVersion")
                    yield body
                    if time.monotonic() >= deadline:
                        return
                if version is None:
                    body = self.get(name)
                    version = body["metadata"].get("resourceVersion")
                    yield body
            except kubernetes.client.ApiException as error:
                if error.status == 410:  # gone: the same, read it afresh
                    version = None
                    continue
                raise _api_error(f"watching workflows/{name}", error) from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise ClusterError(f"watching workflows/{name}: cannot reach the API server "
                                   f"of {self.where}: {error}") from None
            finally:
                stream.stop()  # type: ignore[no-untyped-call]

    # --- agents as pods -------------------------------------------------------------------------

    def pods(self, labels: dict[str, str]) -> list[Any]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        found = self._call(f"listing the pods of {selector}", self.core.list_namespaced_pod,
                           self.namespace, label_selector=selector)
        return list(found.items)

    def pod_log(self, pod: str, container: str = "agent") -> str:
        text: str = self._call(f"reading the log of pod {pod}",
                               self.core.read_namespaced_pod_log, pod, self.namespace,
                               container=container)
        return text

    def follow_pod_log(self, pod: str, container: str = "agent") -> Iterator[str]:
        """The pod's log, line by line, until its container ends."""
        try:
            response: Any = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=container, follow=True,
                _preload_content=False, _request_timeout=None)
        except kubernetes.client.ApiException as error:
            raise _api_error(f"following the log of pod {pod}", error) from None
        try:
            pending = b""
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            response.release_conn()


def _connect(target: Target) -> tuple[Any, str, str]:
    """An API client, the namespace the context names (else ``default``), and a name of the
    cluster for messages. Without a kubeconfig, inside a pod: its service account's."""
    configuration = kubernetes.client.Configuration()
    try:
        if target.kubeconfig is None and target.context is None and \
                SERVICE_ACCOUNT_NAMESPACE.exists():
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            return api_client(configuration), namespace, "this cluster"
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=target.kubeconfig, context=target.context,
            client_configuration=configuration)
        contexts, active = kubernetes.config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=target.kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as error:
        raise ConfigError(f"no cluster to talk to: {error} (set KUBECONFIG, or give "
                          "--kubeconfig / --context)") from None
    chosen = next((c for c in contexts if c["name"] == target.context), active) \
        if target.context else active
    namespace = (chosen.get("context") or {}).get("namespace") or "default"
    return api_client(configuration), namespace, \
        f"context {chosen['name']} ({configuration.host})"


def _api_error(action: str, error: kubernetes.client.ApiException) -> AgentainerError:
    reason = error.reason
    try:
        reason = json.loads(error.body or "").get("message") or reason
    except (TypeError, ValueError, AttributeError):
        pass
    if error.status == 404:
        return NotFoundError(f"{action}: not found ({reason})")
    if error.status == 409:
        return ConflictError(f"{action}: {reason}")
    return ClusterError(f"{action}: {error.status} {reason}")
