"""The fedmq coordinator: validates, aggregates and republishes the global model."""
