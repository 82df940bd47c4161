"""PostgreSQL: pools and retries, migrations, subscriptions, dead letters, and the
database half of ``delivery status``."""
