"""CoalescedWrites: a response's head goes out with its body, in one write, and never
waits past the event loop's next turn. (Every integration test's server runs on it too.)"""

from __future__ import annotations

import asyncio
from typing import Any

from stavily.api.http import CoalescedWrites

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder(asyncio.Transport):
    """The socket's side: what was written, each call apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def run(scenario: Any) -> None:
    asyncio.run(scenario())


def test_head_and_body_go_in_one_write() -> None:
    async def scenario() -> None:
        socket = Recorder()
        transport = CoalescedWrites(socket)
        transport.write(HEAD)
        assert socket.writes == []
        transport.write(b"{}")
        assert socket.writes == [HEAD + b"{}"]
        await asyncio.sleep(0)  # the flush that was set up is off: nothing more
        transport.write(HEAD)
        transport.write(memoryview(b"[]"))
        assert socket.writes == [HEAD + b"{}", HEAD + b"[]"]

    run(scenario)


def test_a_head_with_no_body_after_it_goes_at_the_next_turn() -> None:
    async def scenario() -> None:
        socket = Recorder()
        transport = CoalescedWrites(socket)
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0)
        assert socket.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        transport.write(b"not a head")  # body parts and the rest go at once
        assert socket.writes[-1] == b"not a head"

    run(scenario)


def test_close_sends_a_held_head_and_abort_drops_it() -> None:
    async def scenario() -> None:
        socket = Recorder()
        transport = CoalescedWrites(socket)
        transport.write(HEAD)
        transport.close()
        assert socket.writes == [HEAD] and socket.closed
        await asyncio.sleep(0)
        assert socket.writes == [HEAD]  # not twice

        socket = Recorder()
        transport = CoalescedWrites(socket)
        transport.write(HEAD)
        transport.abort()
        await asyncio.sleep(0)
        assert socket.writes == [] and socket.aborted
        # everything else is the socket's own
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)

    run(scenario)
