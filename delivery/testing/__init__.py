"""Dev tooling for the tests, the demo, the chaos suite and the benchmarks: throwaway
PostgreSQL and RabbitMQ, and the controllable webhook receiver. Never imported by
production code."""
