"""The peers: the same job (consume, dedupe in PostgreSQL, POST signed, record, ack) written the
way people write it with Celery, Dramatiq and plain asyncio. ``common`` holds what they share;
``systems`` is their orchestration (how the bench starts, feeds, counts and stops each)."""
