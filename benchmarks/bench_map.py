"""jobs.map of a CPU-bound function over 2,000 items on 2 cores, in a real kernel.

Side by side in one kernel, each timed inside the kernel from the call to the
last result (pool start-up included for both pools):

* a plain ``[f(x) for x in items]`` loop (the baseline; bar: jobs.map >= 1.8x faster);
* ``concurrent.futures.ProcessPoolExecutor(2, fork).map`` with the same chunk size
  (bar: jobs.map >= 1.0x, i.e. no slower);
* ``jobs.map(f, items, workers=2, mode="process")``.

Each is the best of `REPEATS` runs: the machine is shared, and the minimum is
the figure least disturbed by other load.
"""

from __future__ import annotations

from harness import KernelSession, Row, print_rows, stock_kernel_argv

ITEMS = 2000
WORKERS = 2
REPEATS = 5

SETUP = f"""
import time, concurrent.futures, multiprocessing
from polycell.map_items import default_chunksize

def burn(n):
    total = 0
    for i in range(20_000):
        total += (i * n) % 7
    return total

items = list(range({ITEMS}))
chunk = default_chunksize(len(items), {WORKERS})

def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    assert out == expected
    return elapsed

expected = [burn(x) for x in items]

def plain():
    return [burn(x) for x in items]

def pool():
    with concurrent.futures.ProcessPoolExecutor(
        {WORKERS}, mp_context=multiprocessing.get_context("fork")
    ) as ex:
        return list(ex.map(burn, items, chunksize=chunk))

def polycell_map():
    job = jobs.map(burn, items, workers={WORKERS}, mode="process")
    job.wait()
    return job.result
"""


def run() -> list[Row]:
    session = KernelSession(stock_kernel_argv(), load_ext=True)
    try:
        session.run(SETUP, timeout=300)
        chunk = session.eval("chunk")
        names = ("plain", "pool", "polycell_map")
        for name in names:
            session.eval(f"timed({name})", timeout=300)  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(REPEATS):  # interleaved, so a burst of outside load hits all three alike
            for name in names:
                runs[name].append(session.eval(f"timed({name})", timeout=300))
        times = {name: min(values) for name, values in runs.items()}
    finally:
        session.close()
    vs_loop = times["plain"] / times["polycell_map"]
    vs_pool = times["pool"] / times["polycell_map"]
    extra = {"items": ITEMS, "workers": WORKERS, "chunksize": chunk}
    return [
        Row("map 2000 CPU items", "plain loop", times["plain"], "s", extra=extra),
        Row("map 2000 CPU items", "ProcessPoolExecutor", times["pool"], "s", extra=extra),
        Row("map 2000 CPU items", "jobs.map process", times["polycell_map"], "s", extra=extra),
        Row("map 2000 CPU items", "speed-up vs loop", vs_loop, "x", ">= 1.8x", vs_loop >= 1.8),
        Row("map 2000 CPU items", "speed-up vs pool", vs_pool, "x", ">= 1.0x", vs_pool >= 1.0),
    ]


if __name__ == "__main__":
    print_rows(run())
