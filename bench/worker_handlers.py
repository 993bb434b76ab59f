"""Handlers for scenario 7 (`ipcd worker --call worker_handlers:noop`): as cheap as a handler gets."""


def noop(body):
    return None
