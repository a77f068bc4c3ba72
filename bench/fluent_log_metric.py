"""One trainer loop of stock `mlflow.log_metric` calls, timed; run in its own process by
bench/run.py (MLflow's fluent API keeps process-wide state).

    python bench/fluent_log_metric.py URI MODE COUNT SECONDS

MODE `sync` logs with MLflow's default (synchronous) calls, `async` with
`synchronous=False`. The loop stops after COUNT calls or SECONDS, whichever is first.
Prints JSON: calls made, the seconds the loop took (what the trainer waits for), and the
seconds until `end_run` returned with every point delivered (checked point by point).
"""

from __future__ import annotations

import json
import sys
import time

import mlflow
from mlflow import MlflowClient


def main() -> None:
    uri, mode, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-fluent")
    synchronous = mode == "sync"
    run = mlflow.start_run()
    done = 0
    started = time.perf_counter()
    limit = started + seconds
    while done < count:
        mlflow.log_metric("loss", float(done), step=done, synchronous=synchronous)
        done += 1
        # Checking the clock every call would cost as much as a fast call itself.
        if done % 256 == 0 and time.perf_counter() > limit:
            break
    loop_s = time.perf_counter() - started
    mlflow.flush_async_logging()
    mlflow.end_run()
    delivered_s = time.perf_counter() - started
    stored = len(MlflowClient().get_metric_history(run.info.run_id, "loss"))
    assert stored == done, f"{stored} of {done} points stored"
    print(json.dumps({"calls": done, "loop_s": loop_s, "delivered_s": delivered_s}))


if __name__ == "__main__":
    main()
