"""Whether W&B runs online, offline or not at all, decided without Lightning (Figure 4, the reports and the sweep's
aggregate run use it too): online only with an API key and a reachable server, never a login prompt or a wait."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from icar.config import ConfigError, LoggerConfig, WandbMode

log = logging.getLogger(__name__)


def has_wandb_key() -> bool:
    """True when an API key is configured: WANDB_API_KEY, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: LoggerConfig) -> str:
    """`auto` -> WANDB_MODE if set, else online with a key and offline without: never a login prompt."""
    if cfg.mode != WandbMode.auto:
        return cfg.mode.value
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_key() else "offline"


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server (or the HTTPS proxy in the way) opens within `timeout` seconds:
    wandb itself waits its whole init_timeout, then fails, on a node without network."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or \
        os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def checked_wandb_mode(cfg: LoggerConfig, run_dir: str | Path) -> str:
    """`wandb_mode`, refusing online without a key (one line) and falling back to offline, with one warning line,
    when the server cannot be reached."""
    mode = wandb_mode(cfg)
    if mode != "online":
        return mode
    if not has_wandb_key():
        raise ConfigError("W&B is set online (logger.mode or WANDB_MODE) but no API key is configured: set"
                          " WANDB_API_KEY or run `wandb login`, or use logger.mode=offline")
    if not wandb_reachable():
        log.warning(f"W&B server {os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')} unreachable: logging"
                    f" offline; upload later with `wandb sync {Path(run_dir) / 'wandb'}/offline-run-*`")
        return "offline"
    return mode
