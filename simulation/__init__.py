"""Many virtual fedmq agents and a coordinator on one machine, for trying and measuring fedmq."""
