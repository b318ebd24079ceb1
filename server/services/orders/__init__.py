"""Order use cases, a module each: `placement.place_orders` (the order + stock
transaction), `reads` (get_order, list_orders), `cancellation.cancel_order`. Expiring
unpaid orders is background work (server/services/upkeep.py)."""
