"""``python -m saga_celery.cli``: the ``saga-celery`` command without its console script."""

from saga_celery.cli import main

main()
