"""Schedules' timing: cron in a time zone (across changes of the clocks), intervals
anchored at their previous fire, misfire policies after downtime, and what is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stavily.errors import InvalidInput
from stavily.workflows.definition import validate
from stavily.workflows.schedules import MAX_CATCH_UP, Timing, cron_problem, due, spec_key


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def series(timing: Timing, start: datetime, count: int) -> list[datetime]:
    out, at = [], start
    for _ in range(count):
        at = timing.next_after(at)
        out.append(at)
    return out


def test_cron_in_a_time_zone() -> None:
    weekdays = Timing("0 9 * * 1-5", "Europe/Paris")
    # Friday 2026-01-09 10:00 Paris (09:00 UTC) -> Monday 09:00 Paris = 08:00 UTC (winter)
    assert weekdays.next_after(utc(2026, 1, 9, 9, 0)) == utc(2026, 1, 12, 8, 0)
    # in summer Paris is UTC+2
    assert weekdays.next_after(utc(2026, 7, 1, 0, 0)) == utc(2026, 7, 1, 7, 0)
    assert Timing("0 9 * * *").next_after(utc(2026, 7, 1, 9, 0)) == utc(2026, 7, 2, 9, 0)
    assert Timing("@hourly").next_after(utc(2026, 7, 1, 9, 30)) == utc(2026, 7, 1, 10, 0)


def test_a_daily_cron_across_the_spring_change() -> None:
    """Paris, 2026-03-29: 02:00 CET becomes 03:00 CEST. 09:00 stays 09:00 local; 02:30
    does not exist that night and fires at 03:30 (the offset before the change)."""
    daily = Timing("0 9 * * *", "Europe/Paris")
    assert series(daily, utc(2026, 3, 27, 12), 3) == [
        utc(2026, 3, 28, 8),  # 09:00 CET
        utc(2026, 3, 29, 7),  # 09:00 CEST
        utc(2026, 3, 30, 7),
    ]
    gap = Timing("30 2 * * *", "Europe/Paris")
    assert series(gap, utc(2026, 3, 27, 12), 3) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 30),  # "02:30" -> 03:30 CEST, once
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]
    hourly = Timing("0 * * * *", "Europe/Paris")
    night = series(hourly, utc(2026, 3, 28, 23, 30), 4)  # 00:30 CET on
    assert night == [utc(2026, 3, 29, h) for h in (0, 1, 2, 3)]  # 01, 03, 04, 05 local
    assert len(set(night)) == len(night)


def test_a_daily_cron_across_the_autumn_change_fires_once() -> None:
    """Paris, 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:30 happens twice: once fired."""
    repeated = Timing("30 2 * * *", "Europe/Paris")
    assert series(repeated, utc(2026, 10, 24, 12), 3) == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first of the two
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
        utc(2026, 10, 27, 1, 30),
    ]
    # from inside the repeated hour (02:10 CET, the second pass): not back to 02:30 CEST
    assert repeated.next_after(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 26, 1, 30)
    daily = Timing("0 9 * * *", "America/New_York")
    assert series(daily, utc(2026, 10, 31, 12), 3) == [
        utc(2026, 10, 31, 13),  # 09:00 EDT
        utc(2026, 11, 1, 14),  # 09:00 EST (the change was that night)
        utc(2026, 11, 2, 14),
    ]


@given(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1)),
    st.sampled_from(["*/30 * * * *", "15 2 * * *", "0 1-4 * * *", "45 0-3 * * 0"]),
    st.sampled_from(["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC"]),
)
def test_cron_times_always_move_forward(at: datetime, expression: str, tz: str) -> None:
    timing = Timing(expression, tz)
    start = at.replace(tzinfo=UTC)
    times = series(timing, start, 6)
    assert all(b > a for a, b in zip([start, *times], times, strict=False))


def test_an_interval_is_anchored_at_its_previous_fire() -> None:
    every = Timing(None, every_seconds=900)
    anchor = utc(2026, 1, 1, 12, 0)
    assert every.next_after(anchor) == utc(2026, 1, 1, 12, 15)
    # late by 7 minutes: the next stays on the anchor's phase
    assert every.next_after(utc(2026, 1, 1, 12, 22), anchor) == utc(2026, 1, 1, 12, 30)
    assert every.next_after(utc(2026, 1, 1, 11, 0), anchor) == anchor


def test_no_misfire_fires_the_one_due_time_under_every_policy() -> None:
    every = Timing(None, every_seconds=60)
    due_at = utc(2026, 1, 1, 12, 0)
    now = due_at + timedelta(seconds=0.4)
    for policy in ("skip", "once", "all"):
        result = due(every, due_at, now, policy, grace=60)
        assert result.fire == [due_at] and result.skipped == 0, policy
        assert result.next_fire_at == utc(2026, 1, 1, 12, 1)
    assert due(every, due_at, due_at - timedelta(seconds=1), "all", 60).fire == []


@pytest.mark.parametrize(
    "timing", [Timing(None, every_seconds=3600), Timing("0 * * * *", "Europe/Paris")]
)
def test_misfire_policies_after_downtime(timing: Timing) -> None:
    """Down from 12:00 to 17:30: five hourly times (12..16) and 17:00 missed."""
    first = utc(2026, 1, 1, 12, 0)
    now = utc(2026, 1, 1, 17, 30)
    missed = [utc(2026, 1, 1, h) for h in range(12, 18)]
    skip = due(timing, first, now, "skip", grace=60)
    assert skip.fire == [] and skip.skipped == 6 and skip.next_fire_at == utc(2026, 1, 1, 18)
    once = due(timing, first, now, "once", grace=60)
    assert once.fire == [missed[-1]] and once.skipped == 5
    every = due(timing, first, now, "all", grace=60)
    assert every.fire == missed and every.skipped == 0
    assert once.next_fire_at == every.next_fire_at == utc(2026, 1, 1, 18)
    # a moment late (a takeover, a slow tick) is not downtime: skip still fires it
    soon = due(timing, utc(2026, 1, 1, 17), utc(2026, 1, 1, 17, 0, 8), "skip", grace=60)
    assert soon.fire == [utc(2026, 1, 1, 17)]


def test_all_fires_at_most_the_cap_the_rest_skipped() -> None:
    every = Timing(None, every_seconds=1)
    first = utc(2026, 1, 1)
    now = first + timedelta(seconds=999.5)
    result = due(every, first, now, "all", grace=60)
    assert len(result.fire) == MAX_CATCH_UP and result.skipped == 1000 - MAX_CATCH_UP
    assert result.fire[-1] == first + timedelta(seconds=999)  # the latest are kept
    assert result.next_fire_at == first + timedelta(seconds=1000)
    # a minutely cron down for a year: walked in bounded time, the latest fired
    cron = Timing("* * * * *")
    year = due(cron, first, utc(2027, 1, 1, 0, 0, 30), "once", grace=60)
    assert year.fire == [utc(2027, 1, 1)] and year.about and year.skipped > 500_000
    assert year.next_fire_at == utc(2027, 1, 1, 0, 1)


def test_the_key_of_a_spec_is_stable() -> None:
    spec: dict[str, Any] = {"cron": "0 9 * * *", "timezone": "UTC", "inputs": {"a": 1}}
    assert spec_key(spec) == spec_key(dict(reversed(list(spec.items()))))
    assert spec_key(spec) != spec_key({**spec, "inputs": {"a": 2}})


BASE = {"name": "scheduled", "actions": {"steps": [{"name": "a", "plugin": "echo"}]}}


def problems(schedules: Any, **extra: Any) -> list[dict[str, str]]:
    with pytest.raises(InvalidInput) as refused:
        validate({**BASE, **extra, "schedules": schedules})
    return refused.value.details  # type: ignore[no-any-return]


def test_schedules_in_a_workflow_validate() -> None:
    definition = validate(
        {
            **BASE,
            "inputs": {"env": {"type": "string", "required": True}},
            "schedules": [
                {"cron": "0 9 * * 1-5", "timezone": "Europe/Paris", "inputs": {"env": "prod"}},
                {"every": "15m", "inputs": {"env": "dev"}, "misfire": "skip", "name": "poll"},
            ],
        }
    )
    first, second = definition.schedules or []
    assert first.misfire == "once" and first.timezone == "Europe/Paris"
    assert second.every == "15m" and second.timezone == "UTC"
    # the stored form validates again
    again = validate(definition.model_dump(mode="json"))
    assert again.schedules == definition.schedules


@pytest.mark.parametrize(
    ("entry", "path", "said"),
    [
        ({"cron": "61 * * * *"}, "schedules[0].cron", "not a valid cron expression"),
        ({"cron": "* * *"}, "schedules[0].cron", "five fields"),
        ({"cron": "0 0 * * * *"}, "schedules[0].cron", "for seconds, use `every`"),
        ({"cron": "0 0 31 2 *"}, "schedules[0].cron", "never fires"),
        ({"cron": "@reboot"}, "schedules[0].cron", "not a cron alias"),
        ({"cron": "0 9 * * *", "timezone": "Mars/Olympus"}, "schedules[0].timezone", "time zone"),
        ({"cron": "0 9 * * *", "every": "1m"}, "schedules[0]", "exactly one of"),
        ({}, "schedules[0]", "exactly one of"),
        ({"every": "0.5s"}, "schedules[0].every", "between 1s and 366d"),
        ({"every": "soon"}, "schedules[0].every", "not a duration"),
        ({"every": "1m", "timezone": "Europe/Paris"}, "schedules[0]", "goes with `cron`"),
        ({"every": "1m", "misfire": "later"}, "schedules[0].misfire", "'skip', 'once' or 'all'"),
    ],
)
def test_bad_schedules_are_refused_with_their_path(
    entry: dict[str, Any], path: str, said: str
) -> None:
    found = problems([entry])
    assert any(p["path"] == path and said in p["message"] for p in found), found


def test_schedule_inputs_are_checked_against_the_workflows() -> None:
    found = problems(
        [{"every": "1m", "inputs": {"count": "three", "other": 1}}],
        inputs={"count": {"type": "integer"}},
    )
    paths = {p["path"] for p in found}
    assert paths == {"schedules[0].inputs.count", "schedules[0].inputs.other"}, found
    assert len(problems([{"every": "1m"}] * 101)) == 1  # at most 100


def test_cron_problem_takes_what_cron_does() -> None:
    for good in ("0 9 * * 1-5", "*/5 * * * *", "0 0 1 1 *", "0 0 * * 7", "@daily"):
        assert cron_problem(good) is None, good
