"""Watching a fedmq fleet: `fedmq-monitor` (live view over MQTT) and `fedmq-report` (plots of the metrics log).

Depends on `protocol` only, like any other MQTT client of the fleet.
"""
