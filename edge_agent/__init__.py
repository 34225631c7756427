"""The fedmq edge agent: trains on local data and sends encoded model deltas over MQTT."""
