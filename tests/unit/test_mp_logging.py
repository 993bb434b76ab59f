"""logs.install_mp_logging: forked children log through the parent's handler.

Runs in a fresh interpreter: the at-fork hooks it installs cannot be removed,
and must not leak into pytest's own process.  The cases are the hazards of
shared/notes/basemanager.md §9 (multiprocessing-logging 0.4.0): os._exit()
children, a child SIGKILLed mid-logging followed by a healthy child, and a
logrotate-style rename, all without losing, garbling or hanging.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from conftest import base_env

SCRIPT = textwrap.dedent('''
    import logging, os, signal, sys, time
    from ipcd.logs import LogSetup, install_mp_logging

    path = sys.argv[1]
    setup = LogSetup(path, "INFO")
    mp = install_mp_logging(setup)
    log = logging.getLogger("ipcd.worker")

    def work(i, n):
        for k in range(n):
            log.info("child %d line %d", i, k)
        if i == 3:
            logging.getLogger("handler.code").warning("via the root logger")
            try:
                1 / 0
            except ZeroDivisionError:
                log.exception("child 3 failed")

    procs = [mp.context.Process(target=work, args=(i, 2000)) for i in range(4)]
    for p in procs:
        p.start()
    for k in range(2000):
        log.info("parent line %d", k)
        if k == 1000:
            os.rename(path, path + ".1")  # logrotate's rename; WatchedFileHandler follows
    for p in procs:
        p.join(30)
        assert p.exitcode == 0, p.exitcode
    pid = os.fork()  # a raw fork ending in os._exit: nothing may be left in a buffer
    if pid == 0:
        for k in range(300):
            log.info("raw child line %d", k)
        os._exit(0)
    os.waitpid(pid, 0)
    victim = mp.context.Process(target=work, args=(9, 10**7))
    victim.start()
    time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)  # killed mid-record
    victim.join(10)
    healthy = mp.context.Process(target=work, args=(10, 100))
    healthy.start()
    healthy.join(10)
    assert healthy.exitcode == 0, healthy.exitcode
    mp.stop()
    log.info("parent done")
''')

LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (INFO|ERROR) ipcd\.worker\[(\d+)\]: "
                  r"(child (\d+) line \d+|parent line \d+|raw child line \d+|child 3 failed|parent done)$")


def test_forked_children_log_through_the_parent(tmp_path):
    script = tmp_path / "mp.py"
    script.write_text(SCRIPT)
    log = tmp_path / "w.log"
    r = subprocess.run([sys.executable, str(script), str(log)], env=base_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no "--- Logging error ---", no fallback lines
    text = (tmp_path / "w.log.1").read_text() + log.read_text()
    counts: dict[str, int] = {}
    pids = set()
    other = []
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            other.append(line)
            continue
        pids.add(m.group(2))
        text3 = m.group(3)
        key = f"child {m.group(4)}" if m.group(4) else text3 if "failed" in text3 or "done" in text3 \
            else text3.rsplit(" ", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    for i in range(4):
        assert counts[f"child {i}"] == 2000
    assert counts["parent line"] == 2000 and counts["raw child line"] == 300
    assert counts["child 10"] == 100 and counts["parent done"] == 1 and counts["child 3 failed"] == 1
    assert counts.get("child 9", 0) > 0  # whatever the victim wrote before SIGKILL, whole lines only
    assert len(pids) == 8  # the parent and 7 children, each under its own pid
    routed = [x for x in other if "WARNING handler.code" in x]  # the root logger is routed too
    assert len(routed) == 1 and routed[0].endswith("via the root logger")
    tb = [x for x in other if x not in routed]
    assert tb[0] == "Traceback (most recent call last):" and tb[-1].startswith("ZeroDivisionError")
    assert "parent line 1001" in log.read_text() and "parent line 1001" not in (tmp_path / "w.log.1").read_text()
