"""fedmq's scale-out tier on NATS JetStream: partition workers, a root, leases (docs/architecture.md)."""
