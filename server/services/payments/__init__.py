"""Payment use cases, a module each: `charging.create_payment`, `settlement.settle_payment`
(the provider's word on a charge), `refunds` (refund_payment, run_refund, complete_refund),
`reads` (get_payment, list_payments) and `webhooks.handle_event`. Cancelling a paid order
refunds it first: server/services/orders/cancellation.py.

A charge is two durable steps. First the payment is recorded PENDING and a provider intent
is created unconfirmed (it can charge nothing); its id is recorded. Only then is it
confirmed, by that recorded id. So a retry, a crash or a concurrent call can at worst
confirm the one recorded intent again, which the provider refuses: an order is never
charged twice, whatever the provider does with idempotency keys.

Every database step is its own short transaction (no transaction is held open across a
provider call). A step that cannot finish leaves its row PENDING with a lease
(`next_check_time`); the reconciler (server/services/upkeep.py) finishes what is left once
the lease runs out, so a crash between steps resumes after restart.
"""
