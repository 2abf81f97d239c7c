"""The controller image builds here with no registry and runs `agentainer` as a non-root user."""

from __future__ import annotations

import subprocess

import docker
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

TAG = "agentainer/controller:test"


@pytest.fixture(scope="module")
def image() -> str:
    built = subprocess.run([str(ROOT / "scripts" / "build-controller-image.sh"), TAG],
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr
    return TAG


def test_controller_image_runs_the_cli_as_a_non_root_user(image: str) -> None:
    client = docker.from_env()
    version = client.containers.run(image, ["--version"], entrypoint=["agentainer"],
                                    remove=True).decode()
    user = client.containers.run(image, ["-u"], entrypoint="id", remove=True).decode()
    config = client.images.get(image).attrs["Config"]
    client.close()

    assert version.strip().startswith("agentainer ")
    assert user.strip() == "10001"
    assert config["Entrypoint"] == ["agentainer", "controller"]
    assert config["User"] == "10001:10001"


def test_controller_image_holds_no_build_tools(image: str) -> None:
    client = docker.from_env()
    found = client.containers.run(
        image, ["-c", "for t in gcc cc make go pip pip3; do command -v $t; done; true"],
        entrypoint="sh", remove=True).decode()
    client.close()
    assert found.strip() == ""
