"""Child flow runs of a deployment on a work pool: start several, wait for them (shared by the fanned-out dataset
build and the multi-node training)."""

from __future__ import annotations

import time
from typing import Callable

from tqdm.auto import tqdm


def start_runs(deployment: str, parameters: list[dict], names: list[str]) -> list:
    """One flow run of `deployment` per parameter set, started now on its pool (not waited for)."""
    from prefect.deployments import run_deployment

    return [run_deployment(deployment, parameters=p, timeout=0, flow_run_name=n) for p, n in zip(parameters, names)]


def wait_runs(runs: list, progress: Callable[[], tuple[int, int]] | None = None, desc: str = "runs",
              poll_s: float = 2.0, fail_fast: bool = False, start_timeout_s: float | None = None,
              stall_s: float = 300.0) -> dict[str, str]:
    """Wait for the runs; returns {run name: final state name} of those that ended (a run still open is absent).

    Stops when every run has ended; or when `progress()` says the work is complete ((done, total), done == total;
    a run whose worker died stays Running on the server); or when some have ended and the work has not moved for
    `stall_s` (the rest are a dead worker's); or, with `fail_fast`, at the first run that ends other than Completed
    (the others are cancelled: a torchrun job cannot go on without a node). A run no worker has started within
    `start_timeout_s` cancels them all.

    Raises:
        KoalaError: runs no worker started in time (the pool needs more workers).
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from koala.errors import KoalaError

    pending = {r.id: r.name for r in runs}
    ended: dict[str, str] = {}
    t0 = moved = time.monotonic()
    last = None
    with get_client(sync_client=True) as client, tqdm(desc=desc, unit="item") as bar:
        while pending:
            time.sleep(poll_s)
            states = {rid: client.read_flow_run(rid).state for rid in pending}
            for rid, state in states.items():
                if state is not None and state.is_final():
                    name = pending.pop(rid)
                    ended[name] = state.name
                    print(f"{name}: {state.name}")
            unstarted = [pending[r] for r, st in states.items() if r in pending and (st is None or st.is_scheduled()
                                                                                   or st.is_pending())]
            if fail_fast and any(v != "Completed" for v in ended.values()) or (
                    start_timeout_s is not None and unstarted and time.monotonic() - t0 > start_timeout_s):
                for rid in pending:
                    client.set_flow_run_state(rid, Cancelled(message="another run of this job failed or never started"),
                                              force=True)
                if unstarted and not any(v != "Completed" for v in ended.values()):
                    raise KoalaError(f"no worker started {sorted(unstarted)} within {start_timeout_s:.0f} s: the pool "
                                     "needs a free worker per run (the run waiting for them holds one too)")
                return ended
            done, total = progress() if progress is not None else (len(ended), len(runs))
            bar.total = total
            bar.update(done - bar.n)
            if done != last:
                last, moved = done, time.monotonic()
            if progress is not None and done == total and pending:
                print(f"all done; still open on the server (a worker died?): {sorted(pending.values())}")
                break
            if progress is not None and ended and time.monotonic() - moved > stall_s:
                print(f"no progress for {stall_s:.0f} s with {sorted(pending.values())} still open (a worker died?)")
                break
    return ended
