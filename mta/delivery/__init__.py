"""Delivery: the scheduler, the worker pool and the couriers (SMTP, local)."""
