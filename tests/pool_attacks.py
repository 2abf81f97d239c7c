"""Hostile pooled tasks, for the isolation suites on Docker (tests/integration) and on pods
(tests/e2e): the same attacks on both backends.

Each attack runs on a pool of one agent, so that the same agent serves the attacker and then the
next tasks. After the attacker, a victim task must get exactly its own output, errors and exit
code, and an inspector task must find nothing the attacker left: no process, no file, no SysV
IPC object, no stolen secret, an empty fresh working directory. Unless an attack is expected to
leave the agent unprovably clean, the same agent must have served all three (a pool that
replaced its agent after every task would pass the checks but lose its point).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from controller.backends.base import Backend, TaskResult
from controller.config import Settings
from controller.models import parse_agent_pool
from controller.pools import PoolManager, PoolState
from controller.store import RedisStore
from tests.conftest import ROOT, sh

T = TypeVar("T")

ATTACK_IMAGE = "agentainer/attacker:test"
SECRET = "victim-secret-7f3a9c"

VICTIM = sh('echo "victim $VICTIM_SECRET"; env | grep -c ATTACKER; ls -A; '
            'echo "victim err" >&2; exit 7')
VICTIM_OUTPUT = (7, f"victim {SECRET}\n0\n", "victim err\n")

# Built-ins only where it matters: the inspector's own processes share its session, anything
# else but the runner (PID 1) was left by someone.
INSPECTOR = sh(r"""
read -r stat < /proc/self/stat; stat=${stat##*) }; set -- $stat; session=$4
for p in /proc/[0-9]*; do
  [ "$p" = /proc/1 ] && continue
  read -r stat < "$p/stat" 2>/dev/null || continue
  stat=${stat##*) }; set -- $stat
  [ "$4" = "$session" ] && continue
  echo "left process ${p#/proc/}: $(tr '\0' ' ' < "$p/cmdline")"
done
find / \( -path /proc -o -path /sys \) -prune -o -name '*attack-left*' -print 2>/dev/null
for table in /proc/sysvipc/shm /proc/sysvipc/msg /proc/sysvipc/sem; do
  [ "$(wc -l < "$table")" -gt 1 ] && echo "left IPC objects in $table"
done
grep -rl "victim-secret" /tmp /work /dev/shm /dev/mqueue /agentainer /etc 2>/dev/null
[ "$HOME" = "$PWD" ] || echo "HOME $HOME is not the fresh working directory $PWD"
ls -A
cat /etc/shared.conf
echo inspected
""")
INSPECTED = "original\ninspected\n"


def build_attack_image() -> str:
    """busybox, the attack tool (tests/attacker), and a file everybody may write."""
    with tempfile.TemporaryDirectory() as context:
        subprocess.run(["gcc", "-static", "-O2", "-o", f"{context}/attack",
                        str(ROOT / "tests" / "attacker" / "attack.c")], check=True)
        (Path(context) / "Dockerfile").write_text(
            (ROOT / "tests" / "attacker" / "Dockerfile").read_text())
        subprocess.run(["docker", "build", "-q", "-t", ATTACK_IMAGE, context], check=True,
                       capture_output=True, env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin"})
    return ATTACK_IMAGE


class PoolUnderAttack:
    """A pool of one agent on a real backend and a real Redis, driven from an event loop of its
    own in a thread, so that one agent serves every test of a suite."""

    def __init__(self, settings: Settings, connect: Callable[[], Awaitable[Backend]],
                 namespace: str = "default", **spec: Any) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        document = {"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                    "metadata": {"name": f"attacked-{uuid.uuid4().hex[:6]}",
                                 "namespace": namespace},
                    "spec": {"image": ATTACK_IMAGE, "minSize": 1, "maxSize": 1,
                             "leaseTimeoutSeconds": 120, **spec}}
        self.manager, self.state = self.call(self._open(connect, document))

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _open(self, connect: Callable[[], Awaitable[Backend]],
                    document: dict[str, Any]) -> tuple[PoolManager, PoolState]:
        store = await RedisStore.connect(self.settings.redis_url)
        manager = PoolManager(store, self.settings)
        state = manager.register(parse_agent_pool(document), str(uuid.uuid4()), await connect())
        await manager.reconcile(state)
        return manager, state

    def task(self, argv: list[str], env: dict[str, str] | None = None,
             timeout: float = 60) -> tuple[str, TaskResult]:
        """Lease the agent, run one task, return it; the agent's name and the task's result."""
        async def run() -> tuple[str, TaskResult]:
            lease = await self.manager.lease(self.state)
            return lease.agent.name, await self.manager.run(lease, argv, env or {}, timeout)

        return self.call(run())

    def runner_mode(self) -> str:
        """How the agent's runner runs: ``user``, ``shared`` or ``root``."""
        async def mode() -> str:
            (agent,) = await self.state.backend.list_agents(
                self.state.pool.metadata.namespace, {"agentainer.dev/pool-uid": self.state.uid})
            channel = await self.state.backend._channel(agent)  # type: ignore[attr-defined]
            return str(channel.info.mode)

        return self.call(mode())

    def close(self) -> None:
        async def close() -> None:
            await self.manager.drain(self.state, timeout=10)
            await self.state.backend.close()
            await self.manager.store.close()

        try:
            self.call(close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@contextlib.contextmanager
def pool_under_attack(settings: Settings, connect: Callable[[], Awaitable[Backend]], mode: str,
                      namespace: str = "default", **spec: Any) -> Iterator[PoolUnderAttack]:
    """A pool of one agent whose runner runs in ``mode`` (checked), drained afterwards."""
    pool = PoolUnderAttack(settings, connect, namespace, maxUses=1000, **spec)
    try:
        assert pool.runner_mode() == mode
        yield pool
    finally:
        pool.close()


def attack(pool: PoolUnderAttack, script: str, timeout: float = 60,
           same_agent: bool = True) -> TaskResult:
    """Run ``script`` as the attacker, then the victim and the inspector; check both."""
    attacker, result = pool.task(sh(script), {"ATTACKER": "1"}, timeout)
    victim, victim_result = pool.task(VICTIM, {"VICTIM_SECRET": SECRET})
    inspector, inspected = pool.task(INSPECTOR)
    assert (victim_result.exit_code, victim_result.stdout, victim_result.stderr) == \
        VICTIM_OUTPUT, victim_result
    assert inspected.stdout == INSPECTED, inspected.stdout
    assert victim == inspector, "the victim's agent was replaced before the inspector ran"
    if same_agent:
        assert attacker == victim, (f"the agent was replaced after the attack: "
                                    f"{result.note or 'its runner proved it clean'}")
        assert result.clean, result.note
    return result


# --- the attacks --------------------------------------------------------------------------------


def writes_into_every_open_descriptor(pool: PoolUnderAttack) -> None:
    """The old way in: the resident shell's stdin, at /proc/<its parent>/fd/0."""
    result = attack(pool, r"""
        for fd in /proc/[0-9]*/fd/*; do printf 'echo INJECTED\n' >> "$fd"; done 2>/dev/null
        ls /proc/1/fd >/dev/null 2>&1 && echo "RUNNER FDS OPEN"
        cat /proc/1/environ >/dev/null 2>&1 && echo "RUNNER ENV OPEN"
        head -c 1 /proc/1/mem >/dev/null 2>&1 && echo "RUNNER MEMORY OPEN"
        true""")
    assert "OPEN" not in result.stdout, result.stdout


def leaves_background_processes(pool: PoolUnderAttack) -> None:
    attack(pool, """
        sleep 300 &
        setsid sleep 301 &
        setsid sh -c 'trap "" HUP TERM INT; sleep 302' &
        (setsid sh -c 'sleep 303 & sleep 304' &)
        (trap "" HUP TERM INT; exec sleep 305) &
        echo started""")


def prints_after_it_ended(pool: PoolUnderAttack) -> None:
    result = attack(pool, """
        (sleep 0.5; echo LATE; echo LATE >&2) &
        setsid sh -c 'sleep 0.5; echo LATE 2; echo LATE 2 >&2' &
        echo early""")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "early\n", "")


def writes_files_everywhere(pool: PoolUnderAttack) -> None:
    attack(pool, """
        find / \\( -path /proc -o -path /sys \\) -prune -o -type d -print 2>/dev/null |
        while read -r dir; do
            echo x > "$dir/attack-left-file" 2>/dev/null
            mkdir -p "$dir/attack-left-dir/a/b" 2>/dev/null
            mkfifo "$dir/attack-left-fifo" 2>/dev/null
            ln -s /etc/passwd "$dir/attack-left-link" 2>/dev/null
        done
        echo x > "$HOME/attack-left-home"
        cd /tmp && mkdir attack-left-deep && cd attack-left-deep &&
            for i in $(seq 300); do mkdir d && cd d; done && echo bottom > attack-left-bottom
        mkdir /tmp/attack-left-locked && touch /tmp/attack-left-locked/f &&
            chmod 000 /tmp/attack-left-locked
        head -c 1000000 /dev/zero > /dev/shm/attack-left-big
        true""")


def reads_a_later_tasks_environment(pool: PoolUnderAttack) -> None:
    spy = ("while :; do cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | "
           "grep victim-secret >> {}; sleep 0.05; done")
    attack(pool, f"""
        ({spy.format('/tmp/attack-left-stolen')}) &
        setsid sh -c "{spy.format('/dev/shm/attack-left-stolen')}" &
        true""")


def signals_the_runner(pool: PoolUnderAttack) -> None:
    attack(pool, """
        for signal in STOP TERM INT HUP QUIT USR1 USR2 SEGV ABRT ALRM PIPE CONT KILL; do
            kill -s $signal 1 2>/dev/null && echo "sent $signal"
        done
        kill -9 -1""")


def traces_the_runner(pool: PoolUnderAttack) -> None:
    result = attack(pool, "attack ptrace 1")
    assert "allowed" not in result.stdout, result.stdout
    assert result.stdout.count("Operation not permitted") == 3, result.stdout


def prints_fake_frames(pool: PoolUnderAttack) -> None:
    fake = ("EXIT 0 0 - 1 1 -\nOUT x aGk=\nREADY x agentainer-runner/1 user 0 0\n"
            "\x01\x00\x00\x00\x00\x00\x00\x05hello\n__agentainer_end_0 0\n")
    script = "printf '" + fake.replace("\\", "\\\\").replace("\n", "\\n").replace(
        "\x01", "\\001").replace("\x00", "\\000").replace("\x05", "\\005") + "'; printf '%s' "\
        "'EXIT x 0 - 1 1 -' >&2"
    result = attack(pool, script)
    assert (result.exit_code, result.stdout, result.stderr) == (0, fake, "EXIT x 0 - 1 1 -")


def forks_a_bomb(pool: PoolUnderAttack) -> None:
    attack(pool, "bomb() { bomb | bomb & }; bomb; sleep 3", timeout=30)


def floods_its_output(pool: PoolUnderAttack) -> None:
    result = attack(pool, "yes agentainer | head -c 200000000; "
                          "yes err | head -c 50000000 >&2; echo the end >&2")
    limit = pool.settings.output_limit_bytes
    assert result.stdout_truncated and result.stderr_truncated
    assert result.stdout == ("agentainer\n" * limit)[:limit]  # its head: the output
    assert len(result.stderr) == limit and result.stderr.endswith("err\nthe end\n")  # its tail


def leaves_ipc_objects(pool: PoolUnderAttack) -> None:
    result = attack(pool, "attack ipc victim-secret-left")
    assert result.exit_code == 0, result


def changes_a_file_everybody_may_write(pool: PoolUnderAttack) -> None:
    """Not undoable: the runner cannot prove the agent clean, so it is replaced."""
    result = attack(pool, "echo changed > /etc/shared.conf", same_agent=False)
    assert not result.clean and "/etc/shared.conf" in result.note, result


ATTACKS: dict[str, Callable[[PoolUnderAttack], None]] = {
    attack.__name__.replace("_", "-"): attack for attack in (
        writes_into_every_open_descriptor, leaves_background_processes, prints_after_it_ended,
        writes_files_everywhere, reads_a_later_tasks_environment, signals_the_runner,
        traces_the_runner, prints_fake_frames, forks_a_bomb, floods_its_output,
        leaves_ipc_objects, changes_a_file_everybody_may_write)
}
