"""Service building blocks over NATS: the engine server (worker side), the dispatcher
(gateway side), admission control, metrics and settings."""
