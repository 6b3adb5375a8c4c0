"""api.metrics.Scrapes: however many scrapes come, an organization's counts are read once
per `ttl`, concurrent scrapes share one read, and organizations do not share answers."""

from __future__ import annotations

import asyncio
from typing import Any

from stavily.api.metrics import Scrapes


def test_scrapes_share_one_read_and_answer_again_within_the_ttl() -> None:
    clock = [100.0]
    reads: list[str] = []

    def reader(organization: str) -> Any:
        async def read() -> bytes:
            reads.append(organization)
            await asyncio.sleep(0.01)
            return f"{organization} {len(reads)}".encode()

        return read

    async def scenario() -> None:
        scrapes = Scrapes(ttl=5, clock=lambda: clock[0])
        together = await asyncio.gather(*(scrapes.text("a", reader("a")) for _ in range(10)))
        assert set(together) == {b"a 1"} and reads == ["a"]
        assert await scrapes.text("b", reader("b")) == b"b 2"  # its own
        clock[0] += 4.9
        assert await scrapes.text("a", reader("a")) == b"a 1"
        clock[0] += 0.2
        assert await scrapes.text("a", reader("a")) == b"a 3"
        assert reads == ["a", "b", "a"]
        fresh = Scrapes(ttl=0)  # still one read for scrapes at the same moment
        await asyncio.gather(*(fresh.text("a", reader("a")) for _ in range(5)))
        assert reads == ["a", "b", "a", "a"]

    asyncio.run(scenario())
