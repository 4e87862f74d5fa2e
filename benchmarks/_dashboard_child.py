"""Viewers of a dashboard, for `benchmarks/dashboard.py`: `python -m benchmarks._dashboard_child URL VIEWERS RATE`.

Each viewer is a thread that fetches the live part of a run's page (`/run?flow=chain&id=watched&part=live`)
and of the runs list, alternately, waiting `1/RATE` seconds after each answer, or 4 times as long as it took
(as an open page's script does, with RATE 1). It
prints `ready` once each viewer made its first request, and, at the end of its standard input, the seconds each
request took, as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request


def viewer(base: str, rate: float, stop: threading.Event, times: list[float], first: threading.Barrier) -> None:
    paths = ["/run?flow=chain&id=watched&part=live", "/?part=live"]
    turn = 0
    started = False
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(base + paths[turn % 2], timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:  # 404 between two runs: a read all the same
            exc.read()
        times.append(time.perf_counter() - t0)
        turn += 1
        if not started:
            started = True
            first.wait()
        stop.wait(max(1 / rate, 4 * times[-1]))  # as dashboard.js waits after each answer


def main() -> None:
    base, viewers, rate = sys.argv[1].rstrip("/"), int(sys.argv[2]), float(sys.argv[3])
    stop = threading.Event()
    times: list[float] = []
    first = threading.Barrier(viewers + 1)
    threads = [threading.Thread(target=viewer, args=(base, rate, stop, times, first)) for _ in range(viewers)]
    for thread in threads:
        thread.start()
    first.wait(timeout=30)
    print("ready", flush=True)
    sys.stdin.read()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
