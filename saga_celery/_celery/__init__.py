"""The Celery adapter: the only part of saga_celery that imports celery."""
