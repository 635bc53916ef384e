"""``saga-celery dashboard``: the sagas in a browser, with a timeline per saga.

Needs the ``saga-celery[dashboard]`` extra (Tornado).  ``view`` computes what a page shows
from the public reading API's answers (pure); ``server`` serves it: the pages, rendered from
the package's own templates, the JSON API under ``/api``, and the static CSS and JS, all
behind basic auth when users are given.  Nothing is fetched from outside the package.
"""
