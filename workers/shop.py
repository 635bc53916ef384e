"""The example saga on the deployable app: the demo's shop, declared on ``workers.app``.

``SAGA_IMPORTS=workers.shop`` (the default) registers its steps and rollbacks
(``saga_celery.demo.shop``: reserve stock, charge the card, open a ticket; failures on
purpose chosen by the params) with the fleet's workers; ``place_order`` starts one.
"""

from __future__ import annotations

from saga_celery.demo.shop import declare_shop
from workers.app import sagas, settings

__all__ = ["ledger_entries", "place_order"]

_shop = declare_shop(sagas, settings.state_url)
place_order = _shop.place_order
"""Reserve 2 x sku-42, charge 4200 (cents) for them, open a fulfilment ticket."""
ledger_entries = _shop.ledger.entries
