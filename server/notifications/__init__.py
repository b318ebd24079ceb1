"""Email to customers about their orders: confirmation, payment receipt, cancellation,
expiry, refund and shipment, rendered from templates (emails.py), sent over SMTP (smtp.py)
by the `notifications` event consumer (consumer.py)."""
