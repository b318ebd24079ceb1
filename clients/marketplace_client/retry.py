"""Which failures the client retries, and how long it waits between attempts."""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from marketplace_client.errors import AbortedError, MarketplaceError, UnavailableError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter; `attempts=1` disables retries."""

    attempts: int = 4
    initial_seconds: float = 0.1
    max_seconds: float = 2.0

    def retrying(self) -> AsyncRetrying:
        backoff = wait_random_exponential(multiplier=self.initial_seconds, max=self.max_seconds)

        def wait(state: RetryCallState) -> float:
            delay: float = backoff(state)
            # The server's RetryInfo is a floor: it knows better than our guess when to retry.
            error = state.outcome.exception() if state.outcome is not None else None
            if isinstance(error, MarketplaceError) and error.retry_delay is not None:
                delay = max(delay, error.retry_delay.total_seconds())
            return delay

        # Only UNAVAILABLE and ABORTED: the server did not apply the request, or (for a
        # response lost on the way back) replaying it with the same request_id is harmless.
        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait,
            retry=retry_if_exception_type((UnavailableError, AbortedError)),
            reraise=True,
        )
