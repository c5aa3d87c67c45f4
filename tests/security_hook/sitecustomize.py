"""Test-only audit hook for a ComfyUI server started by tests/host/test_security.py.

Put on the server's PYTHONPATH (never shipped, never imported by the pack): Python imports
`sitecustomize` at start-up, before ComfyUI. It logs, one JSON line per event, to
$BARYCENTER_AUDIT_LOG:
- socket.connect / socket.bind / socket.getaddrinfo,
- pickle.find_class (an unpickler resolving a global: real unpickling),
- open / os.open with a write, append or create mode,
- subprocess.Popen / os.system,
- exec of a module code object from a pack file (proves the prefixes match how the server names
  the pack's files, so the `pack` flag below is not vacuous),
with `pack` true when a frame of the pack's merge code is on the stack: a frame whose file lies
under one of the $BARYCENTER_AUDIT_PACK prefixes (os.pathsep-separated: the repo's nodes/,
engine/, kernels/ as the server imports them, through the custom_nodes link and resolved).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

_LOG_PATH = os.environ.get("BARYCENTER_AUDIT_LOG")
_PREFIXES = tuple(p for p in os.environ.get("BARYCENTER_AUDIT_PACK", "").split(os.pathsep) if p)
_WATCHED = {"socket.connect", "socket.bind", "socket.getaddrinfo", "pickle.find_class", "open",
            "subprocess.Popen", "os.system"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install():
    # opened before the hook exists, and never reopened: the hook's own writes raise no event
    log = open(_LOG_PATH, "a", buffering=1, encoding="utf-8")
    lock = threading.Lock()
    busy = threading.local()

    def writes(args) -> bool:
        mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)

    def pack_frame():
        f = sys._getframe(2)
        while f is not None:
            name = f.f_code.co_filename
            if name.startswith(_PREFIXES):
                return f"{name}:{f.f_lineno}"
            f = f.f_back
        return None

    def hook(event, args):
        if event == "exec":
            code = args[0] if args else None
            name = getattr(code, "co_filename", "")
            if isinstance(name, str) and name.startswith(_PREFIXES):
                with lock:
                    log.write(json.dumps({"t": time.time(), "event": "exec", "path": name, "pack": True,
                                          "where": name, "args": []}) + "\n")
            return
        if event not in _WATCHED or getattr(busy, "on", False):
            return
        if event == "open" and not writes(args):
            return
        busy.on = True
        try:
            where = pack_frame()
            record = {"t": time.time(), "event": event, "args": [repr(a)[:300] for a in args],
                      "pack": where is not None, "where": where, "thread": threading.current_thread().name}
            if event == "open":
                path = args[0]
                if isinstance(path, bytes):
                    path = path.decode(errors="replace")
                record["path"] = os.path.abspath(path) if isinstance(path, str) else repr(path)
            with lock:
                log.write(json.dumps(record) + "\n")
        except Exception:
            pass  # an audit hook must never break the server
        finally:
            busy.on = False

    sys.addaudithook(hook)


if _LOG_PATH and _PREFIXES:
    _install()
