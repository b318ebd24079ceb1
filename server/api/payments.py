"""PaymentService: translation between protobuf and the payment use cases."""

from __future__ import annotations

from typing import Any

import grpc

from marketplace.payment.v1 import payment_pb2, payment_pb2_grpc
from server.adapters.stripe_webhooks import StripeWebhooks
from server.api import convert
from server.api.context import current_principal
from server.domain.pagination import page_size
from server.domain.payments import payment_request, refund_request
from server.domain.validation import parse_resource_id
from server.services.payments.charging import Charging
from server.services.payments.reads import PaymentReads
from server.services.payments.refunds import Refunds
from server.services.payments.webhooks import ProviderEvents

Context = grpc.aio.ServicerContext[Any, Any]
# Envoy's transcoder hands HTTP headers through as gRPC metadata, lower-cased.
SIGNATURE_HEADER = "stripe-signature"


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    def __init__(
        self,
        charging: Charging,
        refunds: Refunds,
        reads: PaymentReads,
        events: ProviderEvents,
        webhooks: StripeWebhooks,
    ) -> None:
        self._charging = charging
        self._refunds = refunds
        self._reads = reads
        self._events = events
        self._webhooks = webhooks

    async def CreatePayment(
        self, request: payment_pb2.CreatePaymentRequest, context: Context
    ) -> payment_pb2.CreatePaymentResponse:
        new_payment = payment_request(request.order_id, request.request_id, request.payment_method)
        payment = await self._charging.create_payment(current_principal(), new_payment)
        return payment_pb2.CreatePaymentResponse(payment=convert.payment(payment))

    async def GetPayment(
        self, request: payment_pb2.GetPaymentRequest, context: Context
    ) -> payment_pb2.GetPaymentResponse:
        payment = await self._reads.get_payment(
            current_principal(), parse_resource_id("id", request.id)
        )
        return payment_pb2.GetPaymentResponse(payment=convert.payment(payment))

    async def ListPayments(
        self, request: payment_pb2.ListPaymentsRequest, context: Context
    ) -> payment_pb2.ListPaymentsResponse:
        payments, next_token = await self._reads.list_payments(
            current_principal(),
            parse_resource_id("order_id", request.order_id),
            page_size(request.page_size),
            request.page_token,
        )
        return payment_pb2.ListPaymentsResponse(
            payments=[convert.payment(p) for p in payments], next_page_token=next_token
        )

    async def RefundPayment(
        self, request: payment_pb2.RefundPaymentRequest, context: Context
    ) -> payment_pb2.RefundPaymentResponse:
        amount, amount_problems = convert.optional_money(
            request.amount if request.HasField("amount") else None
        )
        refund = refund_request(
            request.id,
            request.request_id,
            amount,
            amount_problems,
            request.reason,
            outside_provider=request.outside_provider,
        )
        payment = await self._refunds.refund_payment(current_principal(), refund)
        return payment_pb2.RefundPaymentResponse(payment=convert.payment(payment))

    async def HandleProviderWebhook(
        self, request: payment_pb2.HandleProviderWebhookRequest, context: Context
    ) -> payment_pb2.HandleProviderWebhookResponse:
        metadata = dict(context.invocation_metadata() or ())
        signature = metadata.get(SIGNATURE_HEADER, "")
        event = self._webhooks.verify(
            request.http_body.data, signature if isinstance(signature, str) else ""
        )
        await self._events.handle_event(event)
        return payment_pb2.HandleProviderWebhookResponse()
