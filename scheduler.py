"""Run a plan of dependent stages, up to `jobs` at a time: what `reproduce.py --jobs=N` uses
to keep a laptop's cores busy. A stage waits for the stages it depends on; the others run
side by side, each in its own process. Nothing here knows the study; nothing here runs on
its own.
"""

import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait


def run_dag(stages, depends_on, run, jobs=1, done=None):
    """Run every stage (run(stage) blocks until it has finished, and raises if it failed),
    each after the stages of depends_on(i) [indices into stages], up to `jobs` at once, in
    plan order where there is a choice. done(i, stage, seconds) is called as each finishes.
    A failure stops new stages from starting; those running finish, then it is raised."""
    waiting, running, failure = list(range(len(stages))), {}, None
    finished = set()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while waiting or running:
            ready = [i for i in waiting if set(depends_on(i)) <= finished] if failure is None else []
            for i in ready[:jobs - len(running)]:
                waiting.remove(i)
                running[pool.submit(timed, run, stages[i])] = i
            if not running:
                if failure is None:  # nothing can start and nothing runs: a dependency never finishes
                    raise RuntimeError(f"stages {waiting} wait on stages that are not in the plan")
                break
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                i = running.pop(future)
                try:
                    seconds = future.result()
                except BaseException as e:  # noqa: BLE001 - re-raised once the others finish
                    failure = failure or e
                    continue
                finished.add(i)
                if done is not None:
                    done(i, stages[i], seconds)
    if failure is not None:
        raise failure


def timed(run, stage):
    start = time.time()
    run(stage)
    return time.time() - start
