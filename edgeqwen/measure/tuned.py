"""The tune cache: `edgeqwen tune`'s winners per device id and build sha256, read by every load that may use
them (bench's child, the CLI for run, chat and serve) without importing the measuring itself (tune.py)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

SCHEMA = 1


def tune_file() -> Path:
    from ..home import home
    return home() / "tune.json"


def _read() -> dict:
    """The tune cache; an unreadable one counts as empty (a warning, then the defaults)."""
    f = tune_file()
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        return {"schema": SCHEMA, "entries": {}}
    except (OSError, ValueError):
        import logging
        logging.getLogger("edgeqwen").warning(f"{f} is unreadable; using llama.cpp's defaults (edgeqwen tune "
                                              "writes it again)")
        return {"schema": SCHEMA, "entries": {}}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {"schema": SCHEMA, "entries": {}}
    return data


def _key(device_id: str, sha: str) -> str:
    return f"{device_id}/{sha}"


def lookup(sha: str | None, device_id: str | None = None) -> dict | None:
    """The stored settings for this machine and build file, when they are valid; else None."""
    if not sha:
        return None
    if device_id is None:
        from .hw import fingerprint
        device_id = fingerprint(bandwidth=False)["device_id"]
    e = _read()["entries"].get(_key(device_id, sha))
    if not isinstance(e, dict):
        return None
    s = e.get("settings")
    ok = (isinstance(s, dict) and isinstance(s.get("threads"), int) and 1 <= s["threads"] <= (os.cpu_count() or 1)
          and isinstance(s.get("flash_attn"), bool) and s.get("kv") in ("f16", "q8_0"))
    return dict(s) if ok else None


def store(sha: str, device_id: str, settings: dict, measured: list[dict]) -> None:
    data = _read()
    data["entries"][_key(device_id, sha)] = {"settings": settings, "measured": measured,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    f = tune_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, f)


