"""The names the payment provider's integration tests import (test_stripe_provider.py,
test_payment_sagas.py): the one test stack of tests/stack.py, run without our server.
Those tests can import from tests.stack and devstack.localstripe directly, and then this
module goes."""

from devstack.localstripe import DECLINED_CARD, SUCCESS_CARD
from tests.stack import FaultInjector, LocalStripe
from tests.stack import Stack as PaymentStack
from tests.stack import running_stack as running_payment_stack

__all__ = [
    "DECLINED_CARD",
    "SUCCESS_CARD",
    "FaultInjector",
    "LocalStripe",
    "PaymentStack",
    "running_payment_stack",
]
