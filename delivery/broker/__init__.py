"""RabbitMQ: connections, topology, the wire format, the relay (outbox -> broker) and
queue depths."""
