"""Dev tooling for the tests, the demo, the chaos suite and the benchmarks: throwaway
PostgreSQL and RabbitMQ (``services``), the controllable webhook receiver (``receiver``), event
factories (``factories``), ``wait_until`` (``waits``), the environment of the processes they
start (``env``) and metric readings (``metrics``). Never imported by production code; it
never imports ``workers`` either (what runs the platform in a test is ``tests/support.py``)."""
