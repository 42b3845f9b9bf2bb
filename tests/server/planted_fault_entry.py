"""Test entry script: the real server (`python -m dashchat.openai_server`) with faults planted in
its engine, each set off by one exact `max_tokens`, so other requests run as usual. Used via
DASHCHAT_TEST_ENTRY (tests/server/server_proc.py).

- CRASH_MAX_TOKENS: the scheduler raises on the step thread, as a scheduling bug would.
- SLOW_MAX_TOKENS: every step that holds such a request takes at least SLOW_STEP_S longer, so it
  runs for SLOW_MAX_TOKENS * SLOW_STEP_S seconds or more however fast the machine is (timeout tests).
"""

from __future__ import annotations

import runpy
import time

from dashchat.engine.native import scheduler

CRASH_MAX_TOKENS = 777
SLOW_MAX_TOKENS = 399
SLOW_STEP_S = 0.25
_schedule = scheduler.Scheduler.schedule


def _planted(self: scheduler.Scheduler) -> scheduler.ScheduledBatch:
    if any(s.params.max_tokens == CRASH_MAX_TOKENS for s in self.waiting):
        raise RuntimeError("planted scheduling bug")
    if any(s.params.max_tokens == SLOW_MAX_TOKENS for s in [*self.running, *self.waiting]):
        time.sleep(SLOW_STEP_S)
    return _schedule(self)


if __name__ == "__main__":
    scheduler.Scheduler.schedule = _planted  # type: ignore[method-assign]
    runpy.run_module("dashchat.openai_server", run_name="__main__", alter_sys=True)
