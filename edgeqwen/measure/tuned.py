"""The tune cache: `edgeqwen tune`'s winners per device id and build sha256, read by every load that may use
them (bench's child, the CLI for run, chat and serve) without importing the measuring itself (tune.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path

SCHEMA = 1


def tune_file() -> Path:
    from ..home import home
    return home() / "tune.json"


def _read() -> dict:
    """The tune cache; an unreadable one counts as empty (a warning, then the defaults)."""
    from ..schemas import read_cache
    data = read_cache(tune_file(), "the tune cache (llama.cpp's defaults are used)")
    if not isinstance(data.get("entries"), dict):
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
        device_id = fingerprint(bandwidth=False, provenance=False)["device_id"]
    e = _read()["entries"].get(_key(device_id, sha))
    if not isinstance(e, dict):
        return None
    s = e.get("settings")
    ok = (isinstance(s, dict) and _threads_ok(s.get("threads")) and isinstance(s.get("flash_attn"), bool)
          and s.get("kv") in ("f16", "q8_0"))
    if not ok:
        return None
    b = s.get("busy")
    busy_ok = isinstance(b, dict) and _threads_ok(b.get("threads")) and isinstance(b.get("spin"), bool)
    return {k: s[k] for k in ("threads", "flash_attn", "kv")} | ({"busy": dict(b)} if busy_ok else {})


def _threads_ok(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= (os.cpu_count() or 1)


BUSY_NOW = 0.5   # cores other processes use at load time that switch a tuned build to its busy-machine settings


def for_now(s: dict, look_s: float = 0.3) -> dict:
    """The tuned settings to load with at this moment: the busy-machine ones (threads, and whether they spin)
    when other processes hold a core now, else the idle winner's. One look at the kernel's counters."""
    b = s.get("busy")
    base = {k: v for k, v in s.items() if k != "busy"}
    if not b:
        return base
    from .busy import idle_look
    others = idle_look(look_s).others
    if others is None or others < BUSY_NOW:
        return base
    import logging
    logging.getLogger("edgeqwen").info(
        f"other processes are using {others:.1f} cores: running with {b['threads']} thread(s) that "
        f"{'spin' if b['spin'] else 'sleep'} while waiting, as `edgeqwen tune` measured best beside a busy process")
    return dict(base, threads=b["threads"], spin=b["spin"])


def store(sha: str, device_id: str, settings: dict, measured: list[dict], beside_hog: list[dict] = ()) -> None:
    data = _read()
    data["entries"][_key(device_id, sha)] = {"settings": settings, "measured": measured,
                                            "beside_hog": list(beside_hog),
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from ..home import write_json_atomic
    f = tune_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, data)


def with_tuned(build: str, options, now: bool = True):
    """(options with `edgeqwen tune`'s stored settings for this machine and BUILD filling what they leave unset, the
    stored settings or None). Threads, KV type and flash attention come from the idle winner; when the threads are
    not given and now is true, the busy-machine settings (threads, spin) if other processes hold a core at this
    moment. Nothing is stored for a format tune does not measure, a build without a manifest, or a model spread
    over workers (measured on one machine)."""
    from dataclasses import replace

    from ..errors import EdgeqwenError
    from ..formats import DEFAULT, of_manifest
    from ..home import resolve_build
    if options.workers:
        return options, None
    try:
        _, manifest = resolve_build(str(build))
    except EdgeqwenError:   # the load says what is wrong with it
        return options, None
    if not manifest or not (of_manifest(manifest) or DEFAULT).tune:   # (an unknown format: nothing tuned)
        return options, None
    s = lookup(manifest.get("sha256"))
    if not s:
        return options, None
    use = s
    if now:   # said where a person loads a model (run, chat, serve); a bench's row records its settings
        import logging
        logging.getLogger("edgeqwen").info(f"tuned settings for {manifest.get('name')}: {s}")
    if not options.threads and now:   # how many threads, and how they wait, follow the machine's load now
        use = for_now(s)
        options = replace(options, spin=use.get("spin", True))
    return replace(options, threads=options.threads or use["threads"], kv=options.kv or use["kv"],
                   flash_attn=use["flash_attn"] if options.flash_attn is None else options.flash_attn), s
