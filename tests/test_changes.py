"""Long-polls wake on a change, not on a timer, and never miss one that lands mid-ask."""

from __future__ import annotations

import asyncio
import threading
import time

from fedcare.coordinator.app import _long_poll
from fedcare.coordinator.changes import Changes


def test_a_change_made_while_asking_is_not_missed() -> None:
    async def scenario() -> float:
        changes = Changes()
        seen = changes.generation
        changes.notify()  # lands after the poll read the generation, before it waits
        started = time.monotonic()
        await changes.wait(seen, 5.0)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.1


def test_a_waiting_poll_answers_when_state_changes_and_asks_once_per_change() -> None:
    calls: list[float] = []
    state = {"ready": False}

    def fetch() -> str | None:
        calls.append(time.monotonic())
        return "task" if state["ready"] else None

    async def scenario() -> tuple[str | None, float]:
        changes = Changes()

        async def writer() -> None:
            await asyncio.sleep(0.5)
            state["ready"] = True
            changes.notify()

        started = time.monotonic()
        task = asyncio.create_task(writer())
        result = await _long_poll(fetch, 10.0, threading.Event(), changes)
        await task
        return result, time.monotonic() - started

    result, elapsed = asyncio.run(scenario())
    assert result == "task"
    # Woken by the change, not by the 1 s fallback (the margin is for a loaded machine).
    assert 0.5 <= elapsed < 0.95
    # Asked when it came in and once after the change: no asking every 100 ms between.
    assert len(calls) == 2


def test_without_changes_a_poll_ends_at_its_wait_having_asked_rarely() -> None:
    calls: list[float] = []

    def fetch() -> None:
        calls.append(time.monotonic())

    async def scenario() -> float:
        started = time.monotonic()
        await _long_poll(fetch, 0.8, threading.Event(), Changes())
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    assert 0.8 <= elapsed < 1.5
    assert len(calls) == 2  # on arrival and at the end of the wait


def test_writes_notify_and_reads_do_not() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from fedcare.coordinator.changes import NotifyOnWrite

    async def endpoint(_: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    changes = Changes()
    app = Starlette(routes=[Route("/x", endpoint, methods=["GET", "POST", "DELETE"])])
    client = TestClient(NotifyOnWrite(app, changes))
    client.get("/x")
    assert changes.generation == 0
    client.post("/x")
    client.delete("/x")
    client.post("/missing")  # a refused write notifies too: harmless, polls just ask again
    assert changes.generation == 3


def test_a_poll_with_a_version_asks_again_only_when_it_moves() -> None:
    """A secure stage's fetchers are not re-asked for every other site's post: only when
    the version moves, and still once when a wait runs out without any change."""
    calls: list[float] = []
    state = {"version": 0, "ready": False}

    def fetch() -> str | None:
        calls.append(time.monotonic())
        return "relay" if state["ready"] else None

    async def scenario() -> tuple[str | None, int]:
        changes = Changes()

        async def writers() -> int:
            for _ in range(20):  # other sites' posts: the stage stays open
                await asyncio.sleep(0.01)
                changes.notify()
            asked = len(calls)
            state["ready"], state["version"] = True, 1  # the stage closes
            changes.notify()
            return asked

        task = asyncio.create_task(writers())
        result = await _long_poll(fetch, 10.0, threading.Event(), changes, lambda: state["version"])
        return result, await task

    result, asked_before_close = asyncio.run(scenario())
    assert result == "relay"
    assert asked_before_close == 1
    assert len(calls) == 2

    # No notification at all: the wait still ends in a fresh ask at its end.
    quiet: list[float] = []

    def never() -> None:
        quiet.append(time.monotonic())

    async def alone() -> None:
        await _long_poll(never, 0.3, threading.Event(), Changes(), lambda: 0)

    asyncio.run(alone())
    assert len(quiet) == 2


def test_a_poll_after_a_post_that_left_its_stage_open_waits_before_asking() -> None:
    """After a post that left its stage collecting (at a version it names), the first ask
    is skipped while that version holds; at another version it asks at once."""
    calls: list[int] = []
    state = {"version": 5}

    def fetch() -> str | None:
        calls.append(state["version"])
        return "relay" if state["version"] == 6 else None

    async def scenario(since: int) -> str | None:
        changes = Changes()

        async def close_the_stage() -> None:
            await asyncio.sleep(0.05)
            state["version"] = 6
            changes.notify()

        task = asyncio.create_task(close_the_stage())
        result = await _long_poll(
            fetch, 10.0, threading.Event(), changes, lambda: state["version"], since=since
        )
        await task
        return result

    assert asyncio.run(scenario(since=5)) == "relay"
    assert calls == [6]
    calls.clear()
    state["version"] = 6
    # Known empty at 5, but it is 6 already (the stage closed meanwhile): asked at once.
    assert asyncio.run(scenario(since=5)) == "relay"
    assert calls == [6]
