"""`python -m tests.sign_flip_agent AGENT-ARGS`: the real fedmq-agent, except that every update it
sends is distorted as simulation.poisoning's attack named by FEDMQ_TEST_ATTACK says (default
`sign-flip`: its honest delta times -4; `inflated-flip`: times -1.5, claiming 10^9 samples): a
hostile device with a valid credential and well-formed updates, for tests through the real CLIs."""

import os
import sys

import edge_agent.cli
from simulation.poisoning import ATTACKS, PoisonedTrainer


class PoisonedAgentTrainer(PoisonedTrainer):
    """LocalTrainer's signature (as edge_agent.cli calls it), the attack applied."""

    def __init__(self, local_epochs: int = 1, batch_size: int | None = None, **kwargs) -> None:
        attack = ATTACKS[os.environ.get("FEDMQ_TEST_ATTACK", "sign-flip")]
        super().__init__(attack, local_epochs=local_epochs, batch_size=batch_size, **kwargs)


if __name__ == "__main__":
    edge_agent.cli.LocalTrainer = PoisonedAgentTrainer
    sys.exit(edge_agent.cli.main())
