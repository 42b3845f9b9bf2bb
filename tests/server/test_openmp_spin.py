"""How long the server's idle OpenMP threads poll before they sleep is libgomp's default unless the user
sets GOMP_SPINCOUNT (or OMP_WAIT_POLICY), and the user's setting reaches the running server (the README
advises a short spin on machines shared with other busy processes). Read back from libgomp itself:
OMP_DISPLAY_ENV=verbose makes every loaded libgomp print the settings it runs with."""

from __future__ import annotations

import os
import re

from server_proc import SMOLLM_ARGS, ServerProcess

SPIN = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")
LIBGOMP_DEFAULT = "300000"


def _server_spin_counts(**extra: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    srv = ServerProcess(*SMOLLM_ARGS, "--max-model-len", "2048", "--speculative-config", "off",
                        env={**env, "OMP_DISPLAY_ENV": "verbose", **extra})
    try:
        srv.wait_ready()
        # the server's libgomp printed its settings when torch loaded it, before the server was ready
        return set(SPIN.findall(srv.log(tail=10**6)))
    finally:
        srv.stop()


def test_server_keeps_libgomps_spin_unless_the_user_sets_one() -> None:
    # a short spin survives a competing process but cost 35% of a quiet machine's one-stream decode
    # (bench/README.md, contention.py): the default stays libgomp's own
    assert _server_spin_counts() == {LIBGOMP_DEFAULT}
    assert _server_spin_counts(GOMP_SPINCOUNT="3000") == {"3000"}
