"""ipcd: named queues for one host — named pipes with structure and guarantees.

    import ipcd
    with ipcd.connect() as c:
        c.send("jobs", {"id": 7})
        m = c.recv("jobs", timeout=5)
        if m is not None:
            print(m.body)
            m.ack()
"""

__version__ = "0.1.0"


def connect(*args, **kwargs):
    """Connect to the daemon (see ipcd.client.connect)."""
    from .client import connect as _connect

    return _connect(*args, **kwargs)


def __getattr__(name):
    # Lazy: `import ipcd` stays cheap for the CLI's fast path.
    if name in ("Client", "Message"):
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
