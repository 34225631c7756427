"""The values of the `state` field of an agent's retained status, shared by the agent that says
them and the monitor that shows them (docs/monitoring.md#agent-states)."""

ONLINE = "online"  # connected; no model yet, or a newer model waiting to be trained on
TRAINING = "training"  # a local round is running
IDLE = "idle"  # has sent its update for the newest model it holds; waits for a newer one
OFFLINE = "offline"  # stopped cleanly, or the broker published the last will
ERROR = "error"  # cannot train on the fleet's model (the reason is in the status, `error`); waits for another
BUDGET_SPENT = "budget_spent"  # local DP: one more update would exceed --dp-epsilon-budget; sends no more
UNHEARD = "unheard"  # its updates do not reach the coordinator, or no model comes (the reason is in `reason`)
STATES = (ONLINE, TRAINING, IDLE, OFFLINE, ERROR, BUDGET_SPENT, UNHEARD)  # every state a status can say
REASON_FIELDS = {ERROR: "error", UNHEARD: "reason"}  # the status field that says why, per state
