"""Who may call which RPC, by full method name, for the interceptor to enforce."""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from marketplace.catalog.v1 import catalog_pb2
from marketplace.events.v1 import dead_letter_service_pb2
from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2
from server.domain.identity import Access

CATALOG_SERVICE = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name
ORDER_SERVICE = order_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name
PAYMENT_SERVICE = payment_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name
DEAD_LETTER_SERVICE = dead_letter_service_pb2.DESCRIPTOR.services_by_name[
    "DeadLetterService"
].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

# Unlisted unary RPCs need a valid token (deny by default); ownership of individual orders
# is checked by the use cases.
ACCESS_POLICIES: dict[str, Access] = {
    f"/{CATALOG_SERVICE}/ListProducts": Access.PUBLIC,
    f"/{CATALOG_SERVICE}/GetProduct": Access.PUBLIC,
    f"/{CATALOG_SERVICE}/CreateProduct": Access.ADMIN,
    f"/{CATALOG_SERVICE}/UpdateProduct": Access.ADMIN,
    f"/{CATALOG_SERVICE}/AdjustStock": Access.ADMIN,
    f"/{ORDER_SERVICE}/CreateOrder": Access.CUSTOMER,
    f"/{ORDER_SERVICE}/GetOrder": Access.AUTHENTICATED,
    f"/{ORDER_SERVICE}/ListOrders": Access.AUTHENTICATED,
    f"/{ORDER_SERVICE}/CancelOrder": Access.AUTHENTICATED,
    f"/{PAYMENT_SERVICE}/CreatePayment": Access.CUSTOMER,
    f"/{PAYMENT_SERVICE}/GetPayment": Access.AUTHENTICATED,
    f"/{PAYMENT_SERVICE}/ListPayments": Access.AUTHENTICATED,
    f"/{PAYMENT_SERVICE}/RefundPayment": Access.ADMIN,
    # Authenticated by the provider's signature over the body, not by a bearer token.
    f"/{PAYMENT_SERVICE}/HandleProviderWebhook": Access.PUBLIC,
    f"/{DEAD_LETTER_SERVICE}/ListDeadLetters": Access.ADMIN,
    f"/{DEAD_LETTER_SERVICE}/ReplayDeadLetter": Access.ADMIN,
    f"/{HEALTH_SERVICE}/Check": Access.PUBLIC,
    f"/{HEALTH_SERVICE}/List": Access.PUBLIC,
}
