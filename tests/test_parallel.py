"""varprop.parallel.Pool.map: a loop's results and errors, on threads."""

import signal
import threading
import time

import pytest

from varprop.parallel import Pool, check_stopped, stopped


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


@pytest.mark.parametrize("outer", [True, False])
@pytest.mark.parametrize("inner", [True, False])
def test_nested_maps_finish_in_either_mode(outer, inner):
    pool, out = Pool(2), []
    run = threading.Thread(target=lambda: out.append(pool.map(
        lambda i: sum(pool.map(lambda j: i * j, range(5), caller=inner)), range(6), caller=outer)), daemon=True)
    run.start()
    run.join(timeout=30)
    assert not run.is_alive() and out == [[10 * i for i in range(6)]]


def test_a_base_exception_in_a_pool_thread_stops_the_map():
    started = []

    def f(x):
        started.append(x)
        if x == 0:
            raise SystemExit("stop")
        time.sleep(0.002)
        return x
    with pytest.raises(SystemExit):
        Pool(2).map(f, range(200), caller=False)
    assert len(started) < 10


@pytest.mark.parametrize("caller", [True, False])
def test_an_interrupt_of_the_caller_does_not_wait_for_running_items(caller):
    # An item running on a pool thread (a replicate group's whole depth) sees stopped() and ends early;
    # the caller's interrupt is raised without waiting for it (the CLI then cleans its staging at once).
    ended_early, running, ran_out = threading.Event(), threading.Event(), threading.Event()

    def long_item(_):
        running.set()
        for _ in range(10_000):  # 10 s unless stopped
            if stopped():
                ended_early.set()
                check_stopped()
            time.sleep(0.001)
        ran_out.set()  # the map's interrupt came too late to stop it

    def interrupted(_):
        running.wait(10)
        raise KeyboardInterrupt
    items = [interrupted, long_item] if caller else [long_item, interrupted]
    if caller:
        with pytest.raises(KeyboardInterrupt):
            Pool(2).map(lambda f: f(None), items)
    else:  # the caller waits on its pool threads: a signal wakes it, as varprop's SIGTERM handler does,
        # even one delivered to another thread (here the sender itself; a native thread of BLAS or torch
        # may take a process's signal), which sets Python's flag but wakes no blocked wait
        class Interrupt(BaseException):
            pass

        def handler(signum, frame):
            raise Interrupt
        previous = signal.signal(signal.SIGUSR1, handler)
        try:
            threading.Thread(target=lambda: running.wait(10) and signal.pthread_kill(threading.get_ident(),
                                                                                     signal.SIGUSR1),
                             daemon=True).start()
            with pytest.raises(Interrupt):
                Pool(2).map(lambda f: f(None), [long_item, long_item], caller=False)
        finally:
            signal.signal(signal.SIGUSR1, previous)
    assert ended_early.wait(5) and not ran_out.is_set()
