"""Test entry script: the real server (`python -m dashchat.openai_server`) with one fault planted
in its engine, as a scheduling bug would be. A request asking for exactly TRIGGER_MAX_TOKENS
makes the scheduler raise on the step thread; nothing else changes. Used via DASHCHAT_TEST_ENTRY."""

from __future__ import annotations

import runpy

from dashchat.engine.native import scheduler

TRIGGER_MAX_TOKENS = 777
_schedule = scheduler.Scheduler.schedule


def _planted(self: scheduler.Scheduler) -> scheduler.ScheduledBatch:
    if any(s.params.max_tokens == TRIGGER_MAX_TOKENS for s in self.waiting):
        raise RuntimeError("planted scheduling bug")
    return _schedule(self)


if __name__ == "__main__":
    scheduler.Scheduler.schedule = _planted  # type: ignore[method-assign]
    runpy.run_module("dashchat.openai_server", run_name="__main__", alter_sys=True)
