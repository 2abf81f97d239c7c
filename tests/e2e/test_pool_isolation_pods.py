"""Pooled agents against hostile tasks, as pods on the real node: the attacks of
tests/pool_attacks.py, each its own test, on a pool of one pod agent.

Two pools: the default one (the runner is root with a handful of capabilities and runs tasks as
another user, allowed by the Pod Security Standard ``baseline``), and one in a namespace that
enforces ``restricted``, where the pod runs as one non-root user without capabilities and the
runner protects itself by being PID 1 and not dumpable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import kubernetes
import pytest

from controller.backends.kubernetes import KubernetesBackend
from controller.config import Settings
from tests.e2e.conftest import Kubectl
from tests.pool_attacks import ATTACKS, PoolUnderAttack, build_attack_image, pool_under_attack

pytestmark = pytest.mark.e2e

RESTRICTED = "restricted-pools"


def restricted_namespace(kubectl: Kubectl) -> str:
    kubectl("create", "namespace", RESTRICTED, check=False)
    kubectl("label", "--overwrite", "namespace", RESTRICTED,
            "pod-security.kubernetes.io/enforce=restricted")
    return RESTRICTED


@pytest.fixture(scope="module")
def attack_image(node_images: Callable[..., None]) -> str:
    image = build_attack_image()
    node_images(image)
    return image


@pytest.fixture(scope="module", params=["user", "restricted"])
def attacked(request: pytest.FixtureRequest, kubectl: Kubectl, redis_url: str,
             attack_image: str) -> Iterator[PoolUnderAttack]:
    # The backend reads the admin's kubeconfig, as KUBECONFIG would give it.
    location = kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kubectl.kubeconfig
    settings = Settings.from_env({}, redis_url=redis_url, pool_wait_seconds=0,
                                 default_backend="kubernetes")
    restricted = request.param == "restricted"
    try:
        with pool_under_attack(
                settings, lambda: KubernetesBackend.connect(settings),
                "shared" if restricted else "user", backend="kubernetes",
                namespace=restricted_namespace(kubectl) if restricted else "default",
                **({"pod": {"runAsNonRoot": True}} if restricted else {})) as pool:
            yield pool
    finally:
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = location


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_task_on_a_pod_leaves_nothing_to_the_next(attacked: PoolUnderAttack,
                                                          attack: str) -> None:
    ATTACKS[attack](attacked)


def test_restricted_namespace_refuses_a_pool_pod_whose_runner_would_be_root(
        kubectl: Kubectl, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restricted pool's namespace really enforces the standard: a default pool pod (root
    runner, added capabilities) is refused there by the API server, naming the standard."""
    import asyncio

    from controller.backends.base import AgentSpec

    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        kubectl.kubeconfig)
    restricted_namespace(kubectl)

    async def start() -> None:
        backend = await KubernetesBackend.connect(Settings.from_env({}, redis_url=redis_url))
        try:
            await backend.start(AgentSpec(
                name="root-runner", image="agentainer/busybox:latest", command=None, args=None,
                env={}, labels={}, resident=True, namespace=RESTRICTED))
        finally:
            await backend.close()

    with pytest.raises(Exception, match='violates PodSecurity "restricted'):
        asyncio.run(start())
