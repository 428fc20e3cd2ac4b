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


def makespan(costs, depends_on, jobs=1):
    """How long run_dag takes if stage i takes costs[i]: the same choices (plan order, up to
    `jobs` at once, each stage after its dependencies), simulated. The last stages of a plan
    often run alone, waiting on one long stage, so this is more than sum(costs) / jobs."""
    waiting, running, finished, now = list(range(len(costs))), {}, set(), 0.0  # running: {i: end time}
    while waiting or running:
        ready = [i for i in waiting if set(depends_on(i)) <= finished]
        for i in ready[:jobs - len(running)]:
            waiting.remove(i)
            running[i] = now + costs[i]
        if not running:
            raise RuntimeError(f"stages {waiting} wait on stages that are not in the plan")
        now = min(running.values())
        for i in [i for i, end in running.items() if end == now]:
            del running[i]
            finished.add(i)
    return now


def timed(run, stage):
    start = time.time()
    run(stage)
    return time.time() - start
