"""`python -m tests.sign_flip_agent AGENT-ARGS`: the real fedmq-agent, except that every delta it
sends is its honest one times -4 (simulation.poisoning's `sign-flip`): a hostile device with a
valid credential and well-formed updates, for tests through the real CLIs."""

import sys

import edge_agent.cli
from simulation.poisoning import ATTACKS, PoisonedTrainer


class SignFlipTrainer(PoisonedTrainer):
    """LocalTrainer's signature (as edge_agent.cli calls it), the sign-flip attack applied."""

    def __init__(self, local_epochs: int = 1, batch_size: int | None = None, **kwargs) -> None:
        super().__init__(ATTACKS["sign-flip"], local_epochs=local_epochs, batch_size=batch_size, **kwargs)


if __name__ == "__main__":
    edge_agent.cli.LocalTrainer = SignFlipTrainer
    sys.exit(edge_agent.cli.main())
