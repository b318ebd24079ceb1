"""The payment provider port: what the payment use cases need of Stripe (or any provider).

The adapter behind it owns timeouts and retries of single calls; the use cases own what a
failure means for a payment. Amounts cross this boundary in minor units (cents), as every
card provider counts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

# The port speaks the domain's charge states; re-exported for the adapters.
from server.domain.payments import IntentStatus as IntentStatus
from server.domain.payments import RefundStatus


@dataclass(frozen=True, slots=True)
class ProviderIntent:
    """One charge at the provider (a Stripe PaymentIntent)."""

    reference: str  # the provider's id, e.g. "pi_..."
    status: IntentStatus
    amount_minor: int
    currency: str  # ISO 4217, upper case
    failure_code: str = ""
    failure_message: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderRefund:
    reference: str  # e.g. "re_..."
    intent_reference: str
    amount_minor: int
    # SUCCEEDED and FAILED are final; PENDING still moves money later (at the card network,
    # or waiting on the customer).
    status: RefundStatus
    metadata: Mapping[str, str] = field(default_factory=dict)


class ProviderError(Exception):
    """Base of every failure the adapter reports."""


class ProviderUnavailable(ProviderError):
    """The provider could not be reached or answered 5xx/429 after the adapter's retries,
    in a way that says the request was not acted on (connection refused, 503 before the
    request was handled). Counts against the circuit breaker."""


class ProviderOutcomeUnknown(ProviderError):
    """The request may have reached the provider but no answer came back (a timeout after
    sending, a reset mid-response). The caller must find out by retrieving, never assume.
    Counts against the circuit breaker."""


class CardDeclined(ProviderError):
    """The provider refused the payment method (declined, expired, unknown `pm_` id).
    A customer's problem, not the provider's: never counts against the circuit breaker."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProviderRejected(ProviderError):
    """The provider refused the request as invalid (4xx other than a decline), e.g. a
    refund larger than what is left, or confirming an intent that is no longer
    confirmable. Not retryable and not the provider's fault."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class PaymentUnknownToProvider(ProviderRejected):
    """The provider has no record of the charge (intent) a request names: its store lost
    it, or we are talking to another account than the one that charged."""

    def __init__(self, reference: str, message: str, status: int) -> None:
        super().__init__("resource_missing", message, status)
        self.reference = reference


class PaymentProvider(Protocol):
    """A card payment provider. Every mutating call carries an idempotency key; the use
    cases still never rely on the provider honouring it (they record intent ids first)."""

    @property
    def name(self) -> str: ...

    async def create_intent(
        self,
        *,
        amount_minor: int,
        currency: str,
        payment_method: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderIntent:
        """Creates an unconfirmed charge: nothing is charged until confirm_intent."""
        ...

    async def confirm_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        """Charges. Raises CardDeclined when the card is refused."""
        ...

    async def retrieve_intent(self, reference: str) -> ProviderIntent:
        """Raises PaymentUnknownToProvider for an intent the provider has no record of,
        as refund and list_refunds do."""
        ...

    async def cancel_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        """Cancels an unconfirmed intent so it can never be charged."""
        ...

    async def refund(
        self,
        intent_reference: str,
        *,
        amount_minor: int,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderRefund: ...

    async def list_refunds(self, intent_reference: str) -> list[ProviderRefund]: ...


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """A verified webhook event. It says which object to look at, never what became of it:
    that is read back from the provider (a signature proves only who holds the secret)."""

    id: str
    type: str
    # The charge an event about a charge's outcome names (a Stripe PaymentIntent id).
    intent_reference: str | None


class InvalidSignature(ProviderError):
    """A webhook whose signature does not verify: not from the provider, or altered."""
