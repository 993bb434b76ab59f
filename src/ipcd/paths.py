"""Where ipcd puts its socket, state and config, and how addresses are parsed.

Pure functions: the environment is passed in as a Mapping (default
``os.environ``) and the uid as an int (default the effective uid), so tests
use a dict and never touch the real /run, /etc or /var. The only functions
that look at the filesystem are ``default_address`` (does ``/run/user/$UID``
exist?) and ``ensure_private_dir``.

Lookup orders (systemd.md §4; systemd's variables are read, never recomputed,
because the user-unit locations moved between systemd versions):

- socket: ``$RUNTIME_DIRECTORY`` → root: ``/run/ipcd`` → ``$XDG_RUNTIME_DIR/ipcd``
  → ``/run/user/$UID/ipcd`` (if that directory exists) → ``/tmp/ipcd-$UID``;
  the file is always ``ipcd.sock``.
- state: ``$STATE_DIRECTORY`` → root: ``/var/lib/ipcd`` → ``$XDG_STATE_HOME/ipcd``
  → ``$HOME/.local/state/ipcd``.
- config: ``$CONFIGURATION_DIRECTORY/config.toml`` → root: ``/etc/ipcd/config.toml``
  → ``$XDG_CONFIG_HOME/ipcd/config.toml`` → ``$HOME/.config/ipcd/config.toml``.

The system locations are module constants so a test can monkeypatch them;
functions read them at call time for that reason.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import stat
from collections.abc import Mapping

from ipcd.errors import ConfigError, PermissionDenied

SOCKET_NAME = "ipcd.sock"
SYSTEM_RUNTIME_DIR = "/run/ipcd"
SYSTEM_STATE_DIR = "/var/lib/ipcd"
SYSTEM_CONFIG_DIR = "/etc/ipcd"
USER_RUNTIME_BASE = "/run/user"
# Always /tmp, never $TMPDIR: the client (cron, a login shell) and the daemon
# must compute the same path from possibly different environments.
TMP_BASE = "/tmp"

# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_UNIX_PATH = 107

_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9.-]+):(?P<port>[^:]*)")
_BRACKETED = re.compile(r"\[(?P<host>[^\]]+)\]:(?P<port>.*)")


def is_root(uid: int | None = None) -> bool:
    """True when ``uid`` (default: the effective uid) is 0."""
    return (os.geteuid() if uid is None else uid) == 0


def _env_dir(env: Mapping[str, str], name: str) -> str | None:
    """The first absolute path in the colon-separated variable ``name``, or None.

    systemd joins several ``RuntimeDirectory=`` entries with ':'; the XDG spec
    says relative paths in its variables are invalid and must be ignored, and
    an empty variable means unset.
    """
    for entry in env.get(name, "").split(":"):
        if entry:
            return entry if os.path.isabs(entry) else None
    return None


def systemd_dir(env: Mapping[str, str] | None, name: str) -> str | None:
    """First entry of a systemd directory variable such as ``RUNTIME_DIRECTORY``.

    Returns None when unset, empty or not absolute. config.py uses this to
    tell whether a default came from systemd (for its ``sources``).
    """
    return _env_dir(os.environ if env is None else env, name)


def _uid(uid: int | None) -> int:
    return os.geteuid() if uid is None else uid


def _home(env: Mapping[str, str], uid: int) -> str:
    """``$HOME``, else the passwd entry (cron and ``env -i`` may drop HOME)."""
    home = _env_dir(env, "HOME")
    if home:
        return home
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        raise ConfigError(
            f"cannot find a home directory for uid {uid}: set HOME or the XDG_* variables"
        ) from None


def default_address(
    env: Mapping[str, str] | None = None, uid: int | None = None
) -> str:
    """The socket path used when nothing is configured (see the module docstring)."""
    env = os.environ if env is None else env
    uid = _uid(uid)
    runtime = _env_dir(env, "RUNTIME_DIRECTORY")
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    if is_root(uid):
        return os.path.join(SYSTEM_RUNTIME_DIR, SOCKET_NAME)
    xdg = _env_dir(env, "XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "ipcd", SOCKET_NAME)
    # cron's PAM stack lacks pam_systemd, so XDG_RUNTIME_DIR is unset there even
    # though the user's runtime dir exists (it does while logged in or lingering).
    user_run = os.path.join(USER_RUNTIME_BASE, str(uid))
    if os.path.isdir(user_run):
        return os.path.join(user_run, "ipcd", SOCKET_NAME)
    return os.path.join(TMP_BASE, f"ipcd-{uid}", SOCKET_NAME)


def default_state_dir(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The state directory used when nothing is configured."""
    env = os.environ if env is None else env
    uid = _uid(uid)
    state = _env_dir(env, "STATE_DIRECTORY")
    if state:
        return state
    if is_root(uid):
        return SYSTEM_STATE_DIR
    xdg = _env_dir(env, "XDG_STATE_HOME")
    if xdg:
        return os.path.join(xdg, "ipcd")
    return os.path.join(_home(env, uid), ".local", "state", "ipcd")


def default_config_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The config file looked for when none is named (it need not exist)."""
    env = os.environ if env is None else env
    uid = _uid(uid)
    configuration = _env_dir(env, "CONFIGURATION_DIRECTORY")
    if configuration:
        return os.path.join(configuration, "config.toml")
    if is_root(uid):
        return os.path.join(SYSTEM_CONFIG_DIR, "config.toml")
    xdg = _env_dir(env, "XDG_CONFIG_HOME")
    if xdg:
        return os.path.join(xdg, "ipcd", "config.toml")
    return os.path.join(_home(env, uid), ".config", "ipcd", "config.toml")


def _parse_port(address: str, port: str) -> int:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"bad port {port!r} in address {address!r}: use a number from 1 to 65535"
        )
    return int(port)


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """Classify an address: ``("unix", path)`` or ``("tcp", (host, port))``.

    - Anything containing '/' is a unix socket path, as is a bare name with
      no ':' (a path relative to the working directory).
    - ``host:port`` and ``[ipv6]:port`` are TCP; the port must be 1-65535.
      Other strings with ':' and no '/' are refused rather than silently
      becoming a socket file named like ``localhost:http``.
    - Abstract addresses (leading '@' or NUL) are refused: any local user can
      connect to them and there are no file permissions to restrict that.
    - Unix paths longer than 107 bytes are refused (the kernel's limit).

    Raises ConfigError naming the address and what is allowed.
    """
    if not isinstance(address, str) or not address:
        raise ConfigError(f"empty address {address!r}: use a socket path or host:port")
    if address[0] in "@\0":
        raise ConfigError(
            f"abstract socket address {address!r} refused: any local user can connect "
            "to it; use a filesystem path"
        )
    if "\0" in address:
        raise ConfigError(f"address {address!r} contains a NUL byte")
    if "/" in address or ":" not in address:
        size = len(os.fsencode(address))
        if size > MAX_UNIX_PATH:
            raise ConfigError(
                f"unix socket path {address!r} is {size} bytes long: "
                f"the maximum is {MAX_UNIX_PATH}"
            )
        return ("unix", address)
    match = _BRACKETED.fullmatch(address)
    if match:
        host = match["host"]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"bad IP address {host!r} in {address!r}: brackets hold an IP, e.g. [::1]:7000"
            ) from None
        return ("tcp", (host, _parse_port(address, match["port"])))
    match = _HOST_PORT.fullmatch(address)
    if match:
        return ("tcp", (match["host"], _parse_port(address, match["port"])))
    raise ConfigError(
        f"bad address {address!r}: use a socket path (containing '/'), host:port, "
        "or [ipv6]:port"
    )


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127/8, ::1, ::ffff:127.x)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 scope id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def ensure_private_dir(path: str, mode: int = 0o700) -> str:
    """Create ``path`` if missing and check it is safe to put a socket in.

    Contract: returns ``path`` only if it is a real directory (not a symlink)
    owned by the effective uid whose group/other bits allow nothing beyond
    ``mode``. Otherwise raises PermissionDenied (it may be another user's
    trap, e.g. a pre-created ``/tmp/ipcd-$UID``) or ConfigError (not a
    directory, cannot be created). An existing directory is never chmod-ed:
    silently fixing a directory someone else could have used hides the problem.
    Missing parents are created with the process umask.
    """
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        pass  # e.g. a dangling symlink: the lstat below reports it
    except PermissionError as exc:
        raise PermissionDenied(f"cannot create directory {path}: {exc.strerror}") from None
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot inspect directory {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PermissionDenied(f"{path} is a symlink: refusing to use it as a private directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} exists and is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise PermissionDenied(
            f"{path} is owned by uid {st.st_uid}, not {euid}: refusing to use it"
        )
    extra = stat.S_IMODE(st.st_mode) & 0o077 & ~mode
    if extra:
        raise PermissionDenied(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, more permissive than "
            f"{mode:04o} for group/other: refusing to use it"
        )
    return path
