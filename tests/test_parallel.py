"""varprop.parallel.Pool.map: a loop's results and errors, on threads."""

import threading
import time

import pytest

from varprop.parallel import Pool


@pytest.mark.parametrize("caller", [True, False])
@pytest.mark.parametrize("threads", [2, 3])
def test_map_is_the_loop_in_order(threads, caller):
    seen = set()

    def f(x):
        seen.add(threading.get_ident())
        time.sleep(0.002 * (x % 3))  # unequal items: threads take them out of order
        return x * x
    assert Pool(threads).map(f, range(40), caller=caller) == [x * x for x in range(40)]
    assert len(seen) >= 2  # the work was shared


@pytest.mark.parametrize("caller", [True, False])
def test_the_first_failing_item_is_raised_and_later_ones_never_start(caller):
    started = []

    def f(x):
        started.append(x)
        if x in (3, 5):
            time.sleep(0.01 if x == 3 else 0)  # 5 fails first in time; 3, earlier in order, is raised
            raise ValueError(f"item {x}")
        time.sleep(0.002)
        return x
    with pytest.raises(ValueError, match="item 3"):
        Pool(2).map(f, range(100), caller=caller)
    assert max(started) < 10  # no item is started once one has failed


def test_a_map_inside_a_map_does_not_wait_on_itself():
    # Every pool thread busy with an outer item, each inner map's own helper can never start: the caller
    # takes the inner items itself and cancels it. (A hang would fail here, not stall the suite.)
    pool, out = Pool(2), []
    run = threading.Thread(target=lambda: out.append(pool.map(
        lambda i: sum(pool.map(lambda j: i * j, range(5))), range(6))), daemon=True)
    run.start()
    run.join(timeout=30)
    assert not run.is_alive() and out == [[10 * i for i in range(6)]]
