"""Stripe behind the payment provider port, through the official SDK's async methods.

Stripe itself, localstripe, or the fault-injecting Envoy listener in front of localstripe:
which one it talks to is only `api_base`.

Each call makes at most `max_attempts` attempts, each bounded by `timeout_seconds`, and
retries only failures that say nothing against the request itself: connection errors,
timeouts, 5xx, 429 (and refusals Stripe marks `Stripe-Should-Retry: true`). Every attempt
of a mutating call carries the same idempotency key, yet nothing here relies on the provider
honouring it: before a confirm, cancel or refund is sent again after an attempt that may
have been acted on (a timeout, a 5xx, a reset mid-response), the adapter looks at the
provider's state and returns what the earlier attempt did instead of doing it twice; a 400
on a confirm or cancel gets the same look (the intent may have moved on without us).
Creating an intent is simply retried: an unconfirmed intent charges nothing.

Failures left after the last attempt: ProviderOutcomeUnknown when some attempt may have
been acted on and no look settled it, ProviderUnavailable when none was (connection refused,
429, a 503 that our egress proxy made up without forwarding). Reads are only ever
ProviderUnavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import stripe
import structlog
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from server.adapters.stripe_answers import (
    Transient,
    charged,
    intent_from_stripe,
    refund_from_stripe,
    translate_error,
)
from server.services.providers import (
    CardDeclined,
    IntentStatus,
    PaymentUnknownToProvider,
    ProviderIntent,
    ProviderOutcomeUnknown,
    ProviderRefund,
    ProviderRejected,
    ProviderUnavailable,
)

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams, RefundCreateParams, RefundListParams

T = TypeVar("T")

_log = structlog.get_logger("marketplace.payments")

# Backoff between attempts: full jitter, exponential from this base, never longer than the cap.
RETRY_BASE_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
REFUNDS_PAGE_SIZE = 100


class StripeProvider:
    """The payment provider port on Stripe's PaymentIntents and Refunds APIs.

    Refunds carry `metadata["refund_id"]` = the idempotency key (added when the caller's
    metadata lacks it, ValueError when it names another); that marker is how a retry
    recognises a refund an earlier attempt made. A new call with a used key is not checked:
    callers look at `list_refunds` first. A confirm that ended in a decline raises
    CardDeclined, also when a look after a lost answer is what found the decline.
    """

    def __init__(
        self,
        *,
        api_key: str,
        api_base: str,
        timeout_seconds: float,
        max_attempts: int,
        tracer: Tracer | None = None,
    ) -> None:
        if timeout_seconds <= 0 or max_attempts < 1:
            raise ValueError("timeout_seconds must be positive and max_attempts at least 1")
        # httpx's timeout bounds each phase (connect, every read); the deadline in _attempt
        # bounds the whole attempt, which a trickle of bytes could otherwise stretch forever.
        self._http = stripe.HTTPXClient(timeout=timeout_seconds)
        # The SDK's own retries are off: ours look at the provider's state before repeating.
        self._stripe = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            http_client=self._http,
            max_network_retries=0,
        )
        self._timeout_seconds = timeout_seconds
        self._max_attempts = max_attempts
        # A span per attempt when tracing is on; its HTTP request is the httpx span inside.
        self._tracer = tracer

    @property
    def name(self) -> str:
        return "stripe"

    @property
    def longest_call_seconds(self) -> float:
        """How long one call may take with all its retries, for whoever leases the work it
        does: every attempt its whole timeout, each followed by the longest backoff. An
        attempt that first looks at the provider's state sends a second request, which
        this does not count."""
        return self._max_attempts * (self._timeout_seconds + RETRY_MAX_SECONDS)

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def create_intent(
        self,
        *,
        amount_minor: int,
        currency: str,
        payment_method: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderIntent:
        params: PaymentIntentCreateParams = {
            "amount": amount_minor,
            "currency": currency.lower(),
            "payment_method": payment_method,
            # Cards only: with Stripe's default (dynamic payment methods, some of which
            # redirect) a server-side confirm without a return_url is refused. The SDK's API
            # version (2026-10-28) no longer takes payment_method_types for this; localstripe
            # 1.15 predates the new name, so devstack teaches the emulator (not this adapter).
            "allowed_payment_method_types": ["card"],
            "metadata": dict(metadata),
        }

        async def send() -> ProviderIntent:
            try:
                created = await self._attempt(
                    "create_intent",
                    lambda: self._stripe.v1.payment_intents.create_async(
                        params, {"idempotency_key": idempotency_key}
                    ),
                )
            except ProviderRejected as rejection:
                # The payment method is the only object this request refers to. Stripe names
                # it (400 resource_missing, param payment_method); localstripe answers a bare
                # 404. Either way the customer gave us a card that does not exist.
                if rejection.status == 404 and rejection.code in ("", "resource_missing"):
                    raise CardDeclined("resource_missing", rejection.message) from rejection
                raise
            return intent_from_stripe(created)

        return await self._mutate("create_intent", send, settle=None)

    async def confirm_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        async def send() -> ProviderIntent:
            confirmed = await self._attempt(
                "confirm_intent",
                lambda: self._stripe.v1.payment_intents.confirm_async(
                    reference, options={"idempotency_key": idempotency_key}
                ),
            )
            return intent_from_stripe(confirmed)

        async def settle() -> ProviderIntent | None:
            intent = intent_from_stripe(await self._fetch_intent("confirm_intent", reference))
            return None if intent.status is IntentStatus.REQUIRES_CONFIRMATION else intent

        return charged(await self._mutate("confirm_intent", send, settle=settle))

    async def retrieve_intent(self, reference: str) -> ProviderIntent:
        try:
            found = await self._read(
                "retrieve_intent", lambda: self._fetch_intent("retrieve_intent", reference)
            )
        except ProviderRejected as rejection:
            if _says_missing(rejection):
                raise PaymentUnknownToProvider(
                    reference, rejection.message, rejection.status
                ) from rejection
            raise
        return intent_from_stripe(found)

    async def cancel_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        async def send() -> ProviderIntent:
            cancelled = await self._attempt(
                "cancel_intent",
                lambda: self._stripe.v1.payment_intents.cancel_async(
                    reference, options={"idempotency_key": idempotency_key}
                ),
            )
            return intent_from_stripe(cancelled)

        async def settle() -> ProviderIntent | None:
            intent = await self._fetch_intent("cancel_intent", reference)
            return intent_from_stripe(intent) if intent.status == "canceled" else None

        return await self._mutate("cancel_intent", send, settle=settle)

    async def refund(
        self,
        intent_reference: str,
        *,
        amount_minor: int,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderRefund:
        if metadata.get("refund_id", idempotency_key) != idempotency_key:
            raise ValueError("metadata['refund_id'] must be the refund's idempotency key")
        params: RefundCreateParams = {
            "payment_intent": intent_reference,
            "amount": amount_minor,
            "metadata": {**metadata, "refund_id": idempotency_key},
        }

        async def send() -> ProviderRefund:
            created = await self._attempt(
                "refund",
                lambda: self._stripe.v1.refunds.create_async(
                    params, {"idempotency_key": idempotency_key}
                ),
            )
            return refund_from_stripe(created, intent_reference)

        async def settle() -> ProviderRefund | None:
            for existing in await self._fetch_refunds("refund", intent_reference):
                if existing.metadata.get("refund_id") == idempotency_key:
                    return existing
            return None

        try:
            return await self._mutate("refund", send, settle=settle)
        except ProviderRejected as rejection:
            raise await self._unknown_intent(intent_reference, rejection) from rejection

    async def list_refunds(self, intent_reference: str) -> list[ProviderRefund]:
        try:
            return await self._read(
                "list_refunds", lambda: self._fetch_refunds("list_refunds", intent_reference)
            )
        except ProviderRejected as rejection:
            raise await self._unknown_intent(intent_reference, rejection) from rejection

    async def _unknown_intent(self, reference: str, rejection: ProviderRejected) -> Exception:
        """A "not found" about a request naming an intent is PaymentUnknownToProvider once a
        look at the intent itself says it is missing (Stripe answers 400 resource_missing
        for a refund of it, localstripe 404); any other rejection stays as it is."""
        if isinstance(rejection, PaymentUnknownToProvider) or not _says_missing(rejection):
            return rejection
        try:
            await self.retrieve_intent(reference)
        except PaymentUnknownToProvider as unknown:
            return unknown
        return rejection

    # --- one attempt -----------------------------------------------------------------------

    async def _attempt(self, operation: str, request: Callable[[], Awaitable[T]]) -> T:
        """One request within the deadline; every failure leaves as a port error or Transient."""
        if self._tracer is None:
            return await self._attempt_untraced(operation, request)
        with self._tracer.start_as_current_span(
            f"stripe {operation}",
            kind=SpanKind.CLIENT,
            attributes={"marketplace.provider": self.name, "marketplace.operation": operation},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await self._attempt_untraced(operation, request)
            except Exception as error:  # recorded on the span, then raised unchanged
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                raise

    async def _attempt_untraced(self, operation: str, request: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await request()
        except TimeoutError as error:
            raise Transient(operation, error, maybe_acted=True) from error
        except stripe.StripeError as error:
            raise translate_error(operation, error) from error

    async def _fetch_intent(self, operation: str, reference: str) -> stripe.PaymentIntent:
        return await self._attempt(
            operation, lambda: self._stripe.v1.payment_intents.retrieve_async(reference)
        )

    async def _fetch_refunds(self, operation: str, intent_reference: str) -> list[ProviderRefund]:
        """All of an intent's refunds, one attempt per page."""
        refunds: list[ProviderRefund] = []
        params: RefundListParams = {"payment_intent": intent_reference, "limit": REFUNDS_PAGE_SIZE}
        while True:
            page = await self._attempt(
                operation, lambda: self._stripe.v1.refunds.list_async(params)
            )
            refunds.extend(refund_from_stripe(item, intent_reference) for item in page.data)
            if not page.has_more or not page.data:
                return refunds
            params["starting_after"] = page.data[-1].id

    # --- retries ---------------------------------------------------------------------------

    def _retrying(self, operation: str) -> AsyncRetrying:
        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            _log.warning(
                "provider_retry",
                provider=self.name,
                operation=operation,
                attempt=state.attempt_number,
                error=str(error),
            )

        return AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=wait_random_exponential(multiplier=RETRY_BASE_SECONDS, max=RETRY_MAX_SECONDS),
            retry=retry_if_exception_type(Transient),
            before_sleep=log_retry,
            reraise=True,
        )

    async def _read(self, operation: str, fetch: Callable[[], Awaitable[T]]) -> T:
        """A read changes nothing, so whatever happened to it, it is just unavailable."""

        # tenacity awaits only what is declared a coroutine function (a lambda is not).
        async def attempt() -> T:
            return await fetch()

        try:
            result: T = await self._retrying(operation)(attempt)
        except Transient as failure:
            raise ProviderUnavailable(str(failure)) from failure
        return result

    async def _mutate(
        self,
        operation: str,
        send: Callable[[], Awaitable[T]],
        *,
        settle: Callable[[], Awaitable[T | None]] | None,
    ) -> T:
        """Sends a change, retrying transient failures.

        `settle` looks at the provider's state and returns the change's result if it has
        already happened, else None. It runs before a retry that follows an attempt which may
        have been acted on, and after a 400 (the object may have moved on without us: a
        confirm of an intent that an earlier, unanswered attempt already charged).
        """
        maybe_acted = False

        async def attempt() -> T:
            nonlocal maybe_acted
            if maybe_acted and settle is not None:
                settled = await settle()
                if settled is not None:
                    return settled
                maybe_acted = False  # the provider's state says the earlier attempt did nothing
            try:
                return await send()
            except Transient as failure:
                maybe_acted = maybe_acted or failure.maybe_acted
                raise
            except ProviderRejected as rejection:
                if rejection.status == 400 and settle is not None:
                    settled = await settle()
                    if settled is not None:
                        return settled
                raise

        try:
            result: T = await self._retrying(operation)(attempt)
        except Transient as failure:
            if maybe_acted:
                raise ProviderOutcomeUnknown(str(failure)) from failure
            raise ProviderUnavailable(str(failure)) from failure
        return result


def _says_missing(rejection: ProviderRejected) -> bool:
    return rejection.status == 404 or rejection.code == "resource_missing"
