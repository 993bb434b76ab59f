"""Scenario 5's baseline: the minimal stdlib-only client process doing one put.

No ipcd import: plain multiprocessing.managers.BaseManager with the daemon's
``queue`` typeid (as tests/integration/test_lifecycle.py STDLIB_CLIENT does).
Usage: python stdlib_put.py SOCKET AUTHKEY_FILE QUEUE JSON_TEXT
"""
import sys
from multiprocessing.managers import BaseManager


class M(BaseManager):
    pass


M.register("queue")
m = M(address=sys.argv[1], authkey=open(sys.argv[2], "rb").read().strip())
m.connect()
m.queue(sys.argv[3]).put(sys.argv[4])
