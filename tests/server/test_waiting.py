import pytest

from server.waiting import GAVE_UP_MARK, WAITING_MARK, SitesMissing, wait_for_sites


class Clock:
    """Time that passes only when the waiting loop sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Nodes:
    """A grid whose sites connect at given times (only get_node_ids is asked)."""

    def __init__(self, clock: Clock, arrivals: list[float]) -> None:
        self.clock, self.arrivals = clock, arrivals

    def get_node_ids(self) -> list[int]:
        return [i for i, at in enumerate(self.arrivals) if at <= self.clock.now]


def test_it_says_every_five_seconds_until_the_sites_come() -> None:
    clock, said = Clock(), []
    grid = Nodes(clock, [0.0, 17.0])
    count = wait_for_sites(grid, min_sites=2, timeout=60, say=said.append, clock=clock,
                           sleep=clock.sleep)
    assert count == 2
    waiting = [line for line in said if "1 of 2 sites" in line]
    assert [line.split("waited ")[1].split("s")[0] for line in waiting] == ["0", "5", "10", "15"]
    assert said[-1].startswith(WAITING_MARK) and "starting" in said[-1]


def test_it_gives_up_at_the_timeout_naming_both_flags() -> None:
    clock, said = Clock(), []
    with pytest.raises(SitesMissing, match="--min-sites.*--wait-timeout"):
        wait_for_sites(Nodes(clock, [0.0]), min_sites=3, timeout=20, say=said.append,
                       clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(20)
    assert said[-1].startswith(GAVE_UP_MARK) and "1 of 3 sites" in said[-1]


def test_enough_sites_start_at_once_silently() -> None:
    clock, said = Clock(), []
    assert wait_for_sites(Nodes(clock, [0, 0, 0]), min_sites=2, timeout=1, say=said.append,
                          clock=clock, sleep=clock.sleep) == 3
    assert said == []
