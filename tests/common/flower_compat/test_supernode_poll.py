"""The SuperNode's waits: Flower's fixed sleeps shortened, every other `time` use untouched."""

import time
from typing import Any

import flwr
import pytest
from flwr.supernode import start_client_internal as loop

from common.flower_compat import clientapp_runtime, supernode_poll
from common.flower_compat.supernode_poll import (
    FAST_POLL_S,
    REPLY_POLL_S,
    PromptTime,
    prompt_supernode,
)


class _Clock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def time(self) -> float:
        return 42.0


def test_the_idle_and_reply_waits_are_shortened_and_nothing_else_changes() -> None:
    clock = _Clock()
    prompt = PromptTime(clock, idle=0.5)  # type: ignore[arg-type]
    for _ in range(12):
        prompt.sleep(3)  # the loop's wait when the SuperLink has no message: backing off
    assert clock.slept[0] == FAST_POLL_S and clock.slept[-1] == 0.5
    assert clock.slept == sorted(clock.slept)
    clock.slept.clear()
    prompt.sleep(0.5)  # its wait for the ClientApp's reply: a message came, ask again soon
    prompt.sleep(3)
    prompt.sleep(0.01)
    assert clock.slept == [REPLY_POLL_S, FAST_POLL_S, 0.01]
    assert prompt.time() == 42.0


def test_the_flower_source_still_has_the_waits_the_patch_shortens() -> None:
    import inspect

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    assert "pull_objects(" in source


def test_the_patch_applies_to_flowers_loop_and_is_refused_on_an_unchecked_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setenv(supernode_poll.POLL_ENV, "0.25")
    assert prompt_supernode()
    assert isinstance(loop.time, PromptTime) and loop.time._idle == 0.25
    assert loop.pull_objects.keywords == {  # type: ignore[attr-defined]
        "initial_backoff": supernode_poll.RETRY_S, "backoff_cap": supernode_poll.RETRY_CAP_S}
    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    assert not prompt_supernode()  # a speed-up only: Flower's own loop runs, with a warning
    assert loop.time is time


def test_a_clientapp_retries_an_object_the_supernode_is_still_receiving_promptly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode.runtime import run_clientapp as runtime

    original: Any = runtime.pull_and_inflate_object_from_tree
    monkeypatch.setattr(runtime, "pull_and_inflate_object_from_tree", original)
    clientapp_runtime.prompt_pulls()
    patched = runtime.pull_and_inflate_object_from_tree
    assert patched.func is original  # type: ignore[attr-defined]
    assert patched.keywords["initial_backoff"] == clientapp_runtime.RETRY_S  # type: ignore[attr-defined]
