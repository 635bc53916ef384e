"""``python -m saga_celery.demo``: the demo, as ``saga-celery demo`` runs it."""

import sys

from saga_celery.demo.runner import main

sys.exit(main())
