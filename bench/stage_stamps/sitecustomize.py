"""``bench/copy_stages.py``'s instrument inside the agent's processes, a measuring tool only.

``copy_stages.py`` puts this folder first on the agent's ``PYTHONPATH`` with
``HARP_STAGE_STAMPS`` naming a folder; Python imports this module at the start of every process
of that agent, and in each it wraps the worker's hot-path functions (``multipart.receive`` and
``send``, ``BatchRunner.run`` and ``call``) to note when each began and ended, in
``time.perf_counter_ns`` (CLOCK_MONOTONIC, one clock for every process of the machine). A
process writes its stamps to ``proc-<pid>.json`` there as it ends (the worker leaves through
``os._exit``, which is wrapped too). Without ``HARP_STAGE_STAMPS`` it does nothing.
"""

from __future__ import annotations

import os

if os.environ.get("HARP_STAGE_STAMPS"):
    import json
    import signal
    import sys
    import time
    from typing import Any

    _clock = time.perf_counter_ns
    _folder = os.environ["HARP_STAGE_STAMPS"]
    #: (what, began ns, ended ns, bytes received or the batch's seq)
    STAMPS: list[tuple[str, int, int, Any]] = []
    _os_exit = os._exit

    def _write() -> None:
        if not STAMPS:
            return
        path = os.path.join(_folder, f"proc-{os.getpid()}.json")
        with open(path + ".part", "w") as f:
            json.dump(STAMPS, f)
        os.replace(path + ".part", path)  # whole or absent: the reader polls for it

    def _exit_writing(code: int) -> None:
        _write()
        _os_exit(code)

    def _terminated(_signum: int, _frame: Any) -> None:
        _exit_writing(0)

    os._exit = _exit_writing
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from gpu_agent import batches, multipart
    except ImportError as e:  # not an agent's process
        print(f"stage stamps: {e}", file=sys.stderr)
    else:
        _receive, _send = multipart.receive, multipart.send
        _run, _call = batches.BatchRunner.run, batches.BatchRunner.call

        def receive(socket: Any, busy_poll_ns: int = 0) -> Any:
            began = _clock()
            parts = _receive(socket, busy_poll_ns)
            STAMPS.append(("W.recv", began, _clock(), sum(len(p) for p in parts[2:])))
            return parts

        def send(socket: Any, parts: Any, flags: int = 0) -> None:
            began = _clock()
            _send(socket, parts, flags)
            STAMPS.append(("W.send", began, _clock(), 0))

        def run(self: Any, header: dict[str, Any], frames: list[Any]) -> Any:
            began = _clock()
            out = _run(self, header, frames)
            STAMPS.append(("W.run", began, _clock(), header.get("q")))
            return out

        def call(self: Any, name: str, args: list[Any], *rest: Any, **named: Any) -> Any:
            began = _clock()
            out = _call(self, name, args, *rest, **named)
            STAMPS.append(("W.op", began, _clock(), name))
            return out

        multipart.receive, multipart.send = receive, send
        batches.BatchRunner.run, batches.BatchRunner.call = run, call
