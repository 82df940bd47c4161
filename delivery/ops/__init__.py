"""Operations utilities every stage uses: metrics, health, logs, tracing and the admin
server. They import only the core (errors, settings, ...), never a pipeline stage."""
