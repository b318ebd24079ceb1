"""PaymentService: translation between protobuf and the payment use cases."""

from __future__ import annotations

from typing import Any

import grpc

from marketplace.payment.v1 import payment_pb2, payment_pb2_grpc
from server.adapters.stripe_webhooks import StripeWebhooks
from server.api import convert
from server.api.context import current_principal
from server.domain import payments as rules
from server.domain.pagination import page_size
from server.domain.validation import parse_resource_id
from server.observability import Metrics
from server.services.payments import Payments

Context = grpc.aio.ServicerContext[Any, Any]
# Envoy's transcoder hands HTTP headers through as gRPC metadata, lower-cased.
SIGNATURE_HEADER = "stripe-signature"


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    def __init__(self, payments: Payments, webhooks: StripeWebhooks, metrics: Metrics) -> None:
        self._payments = payments
        self._webhooks = webhooks
        self._metrics = metrics

    async def CreatePayment(
        self, request: payment_pb2.CreatePaymentRequest, context: Context
    ) -> payment_pb2.CreatePaymentResponse:
        payment_request = rules.payment_request(
            request.order_id, request.request_id, request.payment_method
        )
        payment = await self._payments.create_payment(current_principal(), payment_request)
        self._metrics.payments_answered.labels(payment.status.value).inc()
        return payment_pb2.CreatePaymentResponse(payment=convert.payment(payment))

    async def GetPayment(
        self, request: payment_pb2.GetPaymentRequest, context: Context
    ) -> payment_pb2.GetPaymentResponse:
        payment = await self._payments.get_payment(
            current_principal(), parse_resource_id("id", request.id)
        )
        return payment_pb2.GetPaymentResponse(payment=convert.payment(payment))

    async def ListPayments(
        self, request: payment_pb2.ListPaymentsRequest, context: Context
    ) -> payment_pb2.ListPaymentsResponse:
        payments, next_token = await self._payments.list_payments(
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
        refund_request = rules.refund_request(
            request.id, request.request_id, amount, amount_problems, request.reason
        )
        payment = await self._payments.refund_payment(current_principal(), refund_request)
        return payment_pb2.RefundPaymentResponse(payment=convert.payment(payment))

    async def HandleProviderWebhook(
        self, request: payment_pb2.HandleProviderWebhookRequest, context: Context
    ) -> payment_pb2.HandleProviderWebhookResponse:
        metadata = dict(context.invocation_metadata() or ())
        signature = metadata.get(SIGNATURE_HEADER, "")
        event = self._webhooks.verify(
            request.http_body.data, signature if isinstance(signature, str) else ""
        )
        await self._payments.handle_event(event)
        return payment_pb2.HandleProviderWebhookResponse()
