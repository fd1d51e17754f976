"""The gateway's hot-path shortcuts behave as the slow paths they replace: the JSON body
scanned by json's C scanner, and the disconnect cancelling the request's own task."""

from __future__ import annotations

import asyncio
import json

import pytest

from vllmd.gateway.intake import CancelOnLeave, RequestIds, json_object
from vllmd.httpserver.asgi import HTTPError

pytestmark = pytest.mark.anyio

BODIES = [
    b'{"model": "m", "prompt": "hi"}',
    b'{"model":"m","messages":[{"role":"user","content":"\\u00e9t\\u00e9 \xc3\xa9"}]}',
    b'{"a": {"b": [1, 2.5, -3e2, true, false, null]}, "c": "x"}',
    b"{}",
    b' {"model": "m"} ',  # whitespace around: the slow path
    '{"model": "m"}'.encode("utf-16"),  # a BOM and UTF-16: json.loads detects it
    '{"model": "m"}'.encode("utf-8-sig"),
]
BAD = [
    b'{"model": "m"',
    b'{"model": "m"} {"x": 1}',  # two values: a trailing object is no longer the first one's
    b'{"model": "m"}}',
    b'{"model": "\x00"}',  # a raw control character
    b"{\xff}",  # not UTF-8
    b"[1, 2]",
    b'"model"',
]


@pytest.mark.parametrize("body", BODIES)
def test_json_object_returns_what_json_loads_returns(body: bytes) -> None:
    assert json_object(body) == json.loads(body)


@pytest.mark.parametrize("body", BAD)
def test_json_object_refuses_what_json_loads_refuses_or_is_no_object(body: bytes) -> None:
    with pytest.raises(HTTPError) as caught:
        json_object(body)
    assert caught.value.status == 400


async def test_a_client_gone_before_the_request_waits_cancels_nothing() -> None:
    """Regression: a callback made at registration (the client had left already) cancelled
    the task outside the request, where no await took it."""
    left = CancelOnLeave()
    left()  # what ON_DISCONNECT does when the client has left already
    assert left.fired
    await asyncio.sleep(0)  # the task was not cancelled: this await returns
    assert not left.uncancel()


async def test_a_client_leaving_cancels_the_wait_and_only_that() -> None:
    left = CancelOnLeave()
    left.arm(asyncio.get_running_loop())
    asyncio.get_running_loop().call_soon(left)  # from the loop, as the server calls back
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(10)
    assert left.uncancel()  # taken back: the task goes on
    await asyncio.sleep(0)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_shutdown_cancel_beside_the_leave_is_not_swallowed() -> None:
    left = CancelOnLeave()
    left.arm(asyncio.get_running_loop())
    task = asyncio.current_task()
    assert task is not None

    def both() -> None:
        left()
        task.cancel()  # the server's shutdown, at the same time

    asyncio.get_running_loop().call_soon(both)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(10)
    assert not left.uncancel()  # the other cancellation stands
    assert task.uncancel() == 0  # (taken back here, so the test itself ends normally)


def test_json_nested_deeper_than_the_parser_goes_is_a_400_not_a_crash() -> None:
    """Regression: RecursionError escaped as a 500 with a traceback in the log."""
    body = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(HTTPError) as caught:
        json_object(body)
    assert caught.value.status == 400


def test_request_ids_are_unique_32_hex_digits_across_blocks() -> None:
    ids = RequestIds()
    made = [ids.next() for _ in range(1000)]  # several blocks of 256
    assert len(set(made)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in made)
    assert made[255][:30] != made[256][:30]  # the next block's counter
