"""A slow device: every local round padded to a set duration, the same way in Flower clients and fedmq agents.

bench/async_advantage.py gives each device a slowdown drawn from the simulator's log-normal
(simulation/stragglers.py) and a round time; a round that trained faster than
`pad` seconds sleeps the rest, so both systems see the same device speeds. Each round prints
`round start T` (wall-clock seconds) so the benchmark knows when training began.

    python bench/padding.py PAD [edge_agent arguments...]   (a padded fedmq agent)
"""

from __future__ import annotations

import functools
import sys
import time


def padded(fn, pad: float):
    """`fn` made to last at least `pad` seconds a call, announcing each call's start."""

    @functools.wraps(fn)
    def round_(*args, **kwargs):
        started = time.time()
        print(f"round start {started:.3f}", flush=True)
        try:
            return fn(*args, **kwargs)
        finally:
            rest = pad - (time.time() - started)
            if rest > 0:
                time.sleep(rest)

    return round_


def main() -> int:
    """A fedmq agent (edge_agent's CLI) whose every update is padded to argv[1] seconds."""
    from edge_agent import cli
    from edge_agent.agent import Agent

    Agent.make_update = padded(Agent.make_update, float(sys.argv[1]))
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
