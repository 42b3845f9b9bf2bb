"""The OpenMP runtime of a started server polls briefly before it sleeps (dashchat sets GOMP_SPINCOUNT
before torch loads libgomp), and a user's own spin or wait policy wins. Read back from libgomp itself:
OMP_DISPLAY_ENV=verbose makes every loaded libgomp print the settings it runs with."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from dashchat.engine.cpu.threads import OPENMP_SPIN_COUNT

from server_proc import REPO, SMOLLM_ARGS, ServerProcess

SPIN = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")


def _env(**extra: str) -> dict[str, str]:
    # without the settings this process has (importing dashchat set GOMP_SPINCOUNT here too)
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return {**env, "OMP_DISPLAY_ENV": "verbose", **extra}


def _spin_counts(text: str) -> set[str]:
    return set(SPIN.findall(text))


def test_started_server_runs_with_the_short_spin() -> None:
    srv = ServerProcess(*SMOLLM_ARGS, "--max-model-len", "2048", "--speculative-config", "off", env=_env())
    try:
        srv.wait_ready()
        # the server's libgomp printed its settings when torch loaded it, before the server was ready
        assert _spin_counts(srv.log(tail=10**6)) == {OPENMP_SPIN_COUNT}, srv.log()
    finally:
        srv.stop()


def _imported_spin(**extra: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", "import dashchat, torch"], cwd=REPO, env=_env(**extra),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _spin_counts(proc.stderr + proc.stdout)


def test_users_own_openmp_settings_win() -> None:
    assert _imported_spin(GOMP_SPINCOUNT="12345") == {"12345"}
    # OMP_WAIT_POLICY=active: libgomp's own long spin, not dashchat's
    assert _imported_spin(OMP_WAIT_POLICY="active") == {"30000000000"}
