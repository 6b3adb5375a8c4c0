"""stavily.logging.Throttled: a flood of one kind of event, from one source or from many,
writes a bounded number of lines and still says how many it left out."""

from __future__ import annotations

from typing import Any

from stavily.logging import Throttled


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning


def test_one_line_per_source_and_period_with_the_count_left_out(monkeypatch: Any) -> None:
    clock = [1000.0]
    monkeypatch.setattr("stavily.logging.time.monotonic", lambda: clock[0])
    out = Lines()
    throttled = Throttled(out, every=10.0)
    for _ in range(100):
        throttled.warning("refused", "10.0.0.1", reason="bad")
    assert out.lines == [("refused", {"source": "10.0.0.1", "reason": "bad"})]
    clock[0] += 10.0
    throttled.info("refused", "10.0.0.1", reason="bad")
    assert out.lines[-1] == ("refused", {"source": "10.0.0.1", "reason": "bad", "left_out": 99})


def test_many_sources_are_capped_per_event_and_counted(monkeypatch: Any) -> None:
    clock = [1000.0]
    monkeypatch.setattr("stavily.logging.time.monotonic", lambda: clock[0])
    out = Lines()
    throttled = Throttled(out, every=10.0, max_keys=100, per_event=5)
    for n in range(1000):  # every request from another address, past the key table's size
        throttled.warning("refused", f"10.0.{n // 256}.{n % 256}")
    throttled.warning("other", "10.0.0.1")  # another kind of event has its own allowance
    assert [e for e, _ in out.lines] == ["refused"] * 5 + ["other"]
    clock[0] += 10.0
    throttled.warning("refused", "192.0.2.1")
    assert out.lines[-2] == ("refused", {"source": "(many)", "left_out": 995, "seconds": 10.0})
    assert out.lines[-1] == ("refused", {"source": "192.0.2.1"})
