"""The README's commands of `agentainer` on this machine, run as a reader would run them (real
Docker engine, real Redis): each must succeed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, readme_commands

pytestmark = pytest.mark.integration


def test_the_readme_s_local_commands_work_as_written(redis_url: str) -> None:
    commands = readme_commands("tests/integration/test_readme.py")
    assert commands[0].startswith("agentainer run") and len(commands) >= 5
    env = {**os.environ, "AGENTAINER_REDIS_URL": redis_url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stderr}"
