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
              poll_s: float = 2.0) -> dict[str, str]:
    """Wait until every run has ended, or until `progress()` says the work is complete ((done, total), done ==
    total): a run whose worker died stays Running on the server. Returns {run name: final state name} of the runs
    that ended; a run still open is absent."""
    from prefect.client.orchestration import get_client

    pending = {r.id: r.name for r in runs}
    ended: dict[str, str] = {}
    with get_client(sync_client=True) as client, tqdm(desc=desc, unit="item") as bar:
        while pending:
            time.sleep(poll_s)
            for rid in list(pending):
                state = client.read_flow_run(rid).state
                if state is not None and state.is_final():
                    name = pending.pop(rid)
                    ended[name] = state.name
                    print(f"{name}: {state.name}")
            if progress is not None:
                done, total = progress()
                bar.total = total
                bar.update(done - bar.n)
                if done == total and pending:
                    print(f"all done; still open on the server (a worker died?): {sorted(pending.values())}")
                    break
            else:
                bar.total = len(runs)
                bar.update(len(ended) - bar.n)
    return ended
