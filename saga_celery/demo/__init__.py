"""The demo: a real saga on a real ``celery worker``, once succeeding, once rolling back.

``saga-celery demo`` (or ``python -m saga_celery.demo``, ``make demo`` in the repository)
runs ``runner``: it starts ``celery -A saga_celery.demo.app worker`` and places two orders of
the ``shop`` saga.  With no ``SAGA_REDIS_URL`` it serves Redis itself (``embedded``: fakeredis
over TCP, from the ``saga-celery[demo]`` extra).  Everything here is importable from the
installed package, because the worker subprocess imports the app by name.
"""
