"""Which W&B mode a run gets: online only with credentials and a reachable server, else offline.

Nothing here ever waits at a login prompt: "auto" picks offline when no credentials exist, and
"online" without them is one clear error.
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
from urllib.parse import urlparse

WANDB_MODES = ("auto", "online", "offline", "disabled")
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}


class WandbCredentialsError(RuntimeError):
    """Online mode was requested but no W&B credentials exist (wandb would prompt for them)."""


def wandb_credentials_source() -> str | None:
    """Where W&B credentials come from (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, a netrc file), or
    None.

    The netrc entry must be for the host of WANDB_BASE_URL (api.wandb.ai by
    default); the netrc file is $NETRC, else ~/.netrc.
    """
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    host = urlparse(_base_url()).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return path if entry and entry[2] else None


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def wandb_host_reachable(url: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens within `timeout` seconds (DNS included).

    Assumed true behind an HTTP(S) proxy, which this check cannot see through.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url or _base_url())
    address = (parsed.hostname or "api.wandb.ai",
               parsed.port or (80 if parsed.scheme == "http" else 443))
    result = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def resolve_wandb_mode(requested: str | None) -> tuple[str, str]:
    """(mode, reason) for a requested mode: None or "auto", "online", "offline", "disabled".

    auto: the WANDB_MODE environment variable if it names a mode, else online
    when credentials exist (see wandb_credentials_source) and the W&B server
    answers (wandb_host_reachable; wandb.init would otherwise wait 90 s before
    failing), and offline when not.
    Raises ValueError for an unknown mode and WandbCredentialsError for online
    without credentials (instead of letting wandb prompt for a login).
    """
    mode = "auto" if requested is None else str(requested).strip().lower()
    if mode not in WANDB_MODES:
        raise ValueError(f"invalid W&B mode {requested!r}; valid modes: {', '.join(WANDB_MODES)}")
    reason = f"{mode} requested"
    if mode == "auto":
        env_mode = _ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower())
        if env_mode is not None:
            mode, reason = env_mode, f"WANDB_MODE={os.environ['WANDB_MODE']}"
        else:
            source = wandb_credentials_source()
            if source is None:
                return "offline", "no credentials found"
            if not wandb_host_reachable():
                return "offline", (f"credentials found but {urlparse(_base_url()).hostname} is "
                                   f"unreachable")
            return "online", f"credentials from {source}"
    if mode == "online" and wandb_credentials_source() is None:
        raise WandbCredentialsError(
            f"W&B online mode ({reason}) needs credentials: set WANDB_API_KEY or run "
            "`wandb login`, or use offline mode and `wandb sync` later")
    return mode, reason
