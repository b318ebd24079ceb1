"""localstripe's Stripe.js emulation, taught `stripe.createPaymentMethod` (which a Stripe page
calls to turn a card field into a `pm_...` id): localstripe 1.15 ships it as an empty stub,
and its API refuses a publishable key on POST /v1/payment_methods, which real Stripe accepts
from browsers. Both are added here, on localstripe's own aiohttp app, before it serves."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# The stub in localstripe-v3.js, and what replaces it: the card element's fields posted as
# Stripe.js posts them (form-encoded, the publishable key as `key`), answered as Stripe.js
# answers ({paymentMethod} or {error}).
_STUB = "createPaymentMethod: async () => {},"
_CREATE_PAYMENT_METHOD = """createPaymentMethod: async (data) => {
      console.log('localstripe: Stripe().createPaymentMethod()');
      const element = data && data.card;
      if (!element || !element.value) {
        return {error: {type: 'validation_error', message: 'Your card number is incomplete.'}};
      }
      const body = new URLSearchParams();
      body.append('type', data.type || 'card');
      Object.keys(element.value.card).forEach(field => {
        body.append('card[' + field + ']', element.value.card[field]);
      });
      body.append('key', apiKey);
      try {
        const response = await fetch(`${LOCALSTRIPE_BASE_API}/v1/payment_methods`, {
          method: 'POST',
          headers: {'Content-Type': 'application/x-www-form-urlencoded'},
          body,
        });
        const res = await response.json().catch(() => ({}));
        if (response.status !== 200 || res.error) {
          return {error: res.error || {message: `HTTP ${response.status}`}};
        }
        return {paymentMethod: res};
      } catch (err) {
        return {error: {type: 'api_connection_error', message: String(err)}};
      }
    },"""

Handler = Callable[[Any], Awaitable[Any]]


def stripe_js_with_payment_methods(original: str) -> str:
    """localstripe-v3.js with createPaymentMethod implemented."""
    if original.count(_STUB) != 1:
        raise RuntimeError("localstripe-v3.js no longer has the createPaymentMethod stub")
    return original.replace(_STUB, _CREATE_PAYMENT_METHOD)


def teach_payment_methods() -> None:
    """Adds to localstripe's app (before it starts) the served Stripe.js above and POST
    /v1/payment_methods with a publishable key, as Stripe.js sends it."""
    from aiohttp import web
    from localstripe import resources, server

    script = stripe_js_with_payment_methods(
        (Path(server.__file__).parent / "localstripe-v3.js").read_text()
    )

    @web.middleware
    async def payment_methods_from_browsers(request: Any, handler: Handler) -> Any:
        if request.method == "GET" and request.path == "/js.stripe.com/v3/":
            return web.Response(text=script, content_type="application/javascript")
        if request.method == "POST" and request.path == "/v1/payment_methods":
            data = await server.get_post_data(request, remove_auth=False) or {}
            key = data.pop("key", None)
            if isinstance(key, str) and key.startswith("pk_"):
                data.pop("payment_user_agent", None)
                method = resources.PaymentMethod._api_create(**data)
                return server.json_response(method._export())
        return await handler(request)

    # After localstripe's error middleware (which makes its UserErrors Stripe's JSON errors),
    # before its authentication, which would refuse the publishable key.
    server.app.middlewares.insert(1, payment_methods_from_browsers)
