"""Run ``ipcd start`` under cProfile in *every* thread (``python -m cProfile`` sees only main).

    python bench/cprofile_daemon.py OUT.prof start [ipcd start args...]

Each thread gets its own cProfile.Profile (started by a threading.setprofile
hook); at exit (SIGTERM: the daemon returns cleanly) all are merged into OUT.prof.
"""

import atexit
import cProfile
import marshal
import sys
import threading

out = sys.argv[1]
profiles = []
_lock = threading.Lock()


def _start(frame, event, arg):
    p = cProfile.Profile()
    with _lock:
        profiles.append(p)
    p.enable()  # replaces this hook for the thread


def _dump():
    main.disable()
    merged = {}
    for p in profiles:
        try:
            p.snapshot_stats()
        except Exception:  # noqa: BLE001 - a thread that never ran
            continue
        for func, (cc, nc, tt, ct, callers) in p.stats.items():
            if func in merged:
                occ, onc, ott, oct_, ocallers = merged[func]
                callers2 = dict(ocallers)
                for k, v in callers.items():
                    if k in callers2:
                        callers2[k] = tuple(a + b for a, b in zip(callers2[k], v))
                    else:
                        callers2[k] = v
                merged[func] = (occ + cc, onc + nc, ott + tt, oct_ + ct, callers2)
            else:
                merged[func] = (cc, nc, tt, ct, dict(callers))
    with open(out, "wb") as f:
        marshal.dump(merged, f)


threading.setprofile(_start)
main = cProfile.Profile()
profiles.append(main)
atexit.register(_dump)
main.enable()
from ipcd.cli import main as ipcd_main  # noqa: E402

sys.exit(ipcd_main(sys.argv[2:]))
