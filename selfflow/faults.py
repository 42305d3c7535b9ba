"""Fault injection for the tests that kill jobs at named moments (real SIGKILLs, nothing simulated).

`SELFFLOW_FAULT=name@step[@rank],...` makes the process that reaches `fault_point(name, step)` (on
rank `rank`, from the launcher's `RANK`, when given) SIGKILL itself there. Nothing else reads the
variable; unset, a fault point is one dictionary lookup.

    fault_point("save.after_engine", state.step)     # training: the moments of a checkpoint save
    fault_point("prepare.shard_done", index)         # prepare: after output shard `index` was sealed
"""

import os
import signal


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process here if `SELFFLOW_FAULT` names `name@step` (and this rank)."""
    spec = os.environ.get("SELFFLOW_FAULT")
    if not spec:
        return
    rank = os.environ.get("RANK", "0")
    for item in spec.split(","):
        parts = item.strip().split("@")
        if parts[:2] == [name, str(step)] and (len(parts) == 2 or parts[2] == rank):
            os.kill(os.getpid(), signal.SIGKILL)
