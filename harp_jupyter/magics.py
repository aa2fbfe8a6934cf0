"""``%harp``: see and steer this kernel's GPU lease from the notebook.

    %harp status          the lease state, agent, GPU, memory, time held, idle countdown,
                          reclaim_after (a dict)
    %harp lease           lease a GPU now (and restore parked state), instead of at the next call
    %harp release         park the device state and give the GPU back now
    %harp idle SECONDS    this kernel's idle timeout (the provisioner releases after it)
    %%harp profile [--export PATH.json] [--no-gpu-timing | --per-op-gpu-timing]
                          run the cell and show one timeline of the notebook and the agent,
                          a summary and the sync-point advisor (harp_jupyter.profiler); a
                          batch of many GPU ops on a stream is timed as one GPU span unless
                          --per-op-gpu-timing (two CUDA events per op: slower launch loops)
    %harp profile [options] STATEMENT      the same for one statement

Loaded in Elastic GPU kernels by the kernelspec (``--ext harp_jupyter.magics``); elsewhere with
``%load_ext harp_jupyter.magics``.
"""

from __future__ import annotations

import html
import shlex
import sys
import time
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

from gpu_agent.sizes import format_bytes as _bytes
from harp_jupyter.shim.notice import show_pending
from provisioner.lease_record import KeeperState

#: the lease states %harp status may show
STATES = KeeperState


class LeaseStatus(dict):
    """The lease state as a dict, shown as a small table in the notebook."""

    _ROWS = (("state", "state"), ("agent", "agent"), ("gpu", "GPU"), ("memory", "memory"),
             ("parked", "parked"), ("held", "held for"), ("idle", "idle release in"),
             ("reclaim", "given to a waiting kernel after"), ("position", "queue position"),
             ("message", ""))

    def _cells(self) -> list[tuple[str, str]]:
        shown: dict[str, str] = {"state": str(self.get("state"))}
        if self.get("agent"):
            shown["agent"] = str(self["agent"])
        if self.get("gpu"):
            shown["gpu"] = str(self["gpu"]) + (" (EMULATED)" if self.get("emulated") else "")
        shown.update(self._memory())
        if self.get("state") == "parked" and self.get("parked_bytes"):
            shown["parked"] = f"{_bytes(self['parked_bytes'])} of device memory"
        if self.get("held_s") is not None:
            shown["held"] = f"{self['held_s']:.0f} s"
        if self.get("idle_left_s") is not None:
            shown["idle"] = f"{self['idle_left_s']:.0f} s (idle timeout {self['idle_timeout']:g} s)"
        if self.get("reclaim_after") is not None:
            shown["reclaim"] = f"{self['reclaim_after']:g} s without GPU work"
        if self.get("position"):
            shown["position"] = str(self["position"])
        if self.get("message"):
            shown["message"] = str(self["message"])
        return [(label, shown[key]) for key, label in self._ROWS if key in shown]

    def _memory(self) -> dict[str, str]:
        """What the user's allocations cover, of the GPU's total, and apart from it what the
        agent reserves for them (it maps device memory in 2 MiB pages): two 40-byte arrays read
        80 B, not 2.0 MiB."""
        allocated, reserved = self.get("memory_allocated"), self.get("memory_used")
        total = self.get("memory_total")
        of_total = f" of {_bytes(total)}" if total else ""
        if allocated is not None:
            apart = (f" ({_bytes(reserved)} reserved in 2 MiB pages)"
                     if reserved is not None and reserved != allocated else "")
            return {"memory": f"{_bytes(allocated)} in your allocations{of_total}{apart}"}
        if reserved is not None:
            return {"memory": f"{_bytes(reserved)} reserved on the GPU{of_total}"}
        return {}

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("\n".join(f"{label + ':' if label else ''} {value}".strip()
                               for label, value in self._cells()))

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
                       f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
                       for label, value in self._cells())
        return f"<table class='harp-lease-status'>{rows}</table>"


def lease_status() -> LeaseStatus:
    """This kernel's lease state: the lease source's view plus the session's device facts."""
    from harp_jupyter.shim.session import get_session

    session = get_session()
    status = dict(session.lease_source.status())
    if session.connected:
        device = session.device
        status.setdefault("gpu", device.get("name"))
        status.setdefault("emulated", session.emulated)
        status.setdefault("memory_total", device.get("total_memory"))
        status["memory_allocated"] = session.allocated_bytes() + _tensor_bytes()
    status["session_restores"] = session.restores
    status["session_parks"] = session.parks
    return LeaseStatus(status)


def _tensor_bytes() -> int:
    """The bytes of this kernel's harp tensors (a model on "harp" is not 0 B): asked of the agent
    where torch is in use, never importing it."""
    harp_torch = sys.modules.get("harp_jupyter.torch")
    return int(harp_torch.HarpDeviceModule.memory_allocated()) if harp_torch is not None else 0


@magics_class
class HarpMagics(Magics):
    @line_cell_magic
    def harp(self, line: str, cell: str | None = None) -> Any:
        """%harp status | lease | release | idle SECONDS | profile (see harp_jupyter.magics)."""
        from harp_jupyter.shim.session import get_session

        words = shlex.split(line)
        command = words[0] if words else "status"
        if command == "profile":
            return self._profile(line.split(None, 1)[1] if len(words) > 1 else "", cell)
        if cell is not None:
            raise ValueError("the cell form is %%harp profile; other commands are %harp lines")
        if command == "status":
            return lease_status()
        if command == "lease":
            started = time.monotonic()
            get_session().connect()
            status = lease_status()
            status["acquire_s"] = round(time.monotonic() - started, 3)
            return status
        if command == "release":
            info = get_session().release()
            if info.get("already"):
                print("The GPU was already parked (the agent took it back while idle, or its "
                      "lease ended). The next GPU call leases again and restores it.")
            else:
                print(f"Released the GPU; {_bytes(info.get('bytes') or 0)} of device memory "
                      "parked on the agent. The next GPU call leases again and restores it.")
            return None
        if command == "idle":
            if len(words) != 2:
                raise ValueError("usage: %harp idle SECONDS")
            seconds = float(words[1])
            if seconds <= 0:
                raise ValueError("the idle timeout must be a positive number of seconds")
            get_session().lease_source.set_idle(seconds)
            print(f"This kernel now releases its GPU after {seconds:g} s without GPU work.")
            return None
        raise ValueError(f"unknown %harp command {command!r}: use status, lease, release, "
                         "idle SECONDS or profile")

    def _profile(self, rest: str, cell: str | None) -> None:
        from IPython.display import display

        from harp_jupyter.profiler.display import ProfileResult
        from harp_jupyter.profiler.profile import run_profiled

        export, gpu_timing, per_op = None, True, False
        words = rest.split()
        while words and words[0].startswith("--"):
            option = words.pop(0)
            if option == "--no-gpu-timing":
                gpu_timing = False
            elif option == "--per-op-gpu-timing":
                per_op = True
            elif option == "--export" and words:
                export = words.pop(0)
            else:
                raise ValueError(f"%harp profile: unknown option {option!r} (use --export "
                                 "PATH.json, --no-gpu-timing, --per-op-gpu-timing)")
        code = cell if cell is not None else " ".join(words)
        if not code.strip():
            raise ValueError("usage: %%harp profile [--export PATH.json] [--no-gpu-timing | "
                             "--per-op-gpu-timing] (cell), or %harp profile [options] "
                             "STATEMENT")
        if per_op and not gpu_timing:
            raise ValueError("%harp profile: --per-op-gpu-timing times GPU ops and "
                             "--no-gpu-timing turns GPU timing off: use one of them")
        with run_profiled(gpu_timing, label=code.strip().splitlines()[0][:80],
                          per_op=per_op) as box:
            outcome = self.shell.run_cell(code, store_history=False)
        assert box.profile is not None
        # the profiled code is "cell" on the timeline; a cell's body runs without the %%harp
        # line, which the editor numbers 1
        box.profile.line_offsets[self._compiled_name(code)] = 1 if cell is not None else 0
        result = ProfileResult(box.profile)
        if export:
            result.export(export)
            print(f"Chrome trace written to {export}: open it in https://ui.perfetto.dev or "
                  "chrome://tracing")
        display(result)
        self.shell.user_ns["_harp_profile"] = result
        _share(result)
        if not outcome.success and outcome.error_in_exec is not None:
            print("(the cell raised an error: the profile covers it up to the error)")


    def _compiled_name(self, code: str) -> str:
        """The file name IPython (or ipykernel) gave ``code`` when run_cell compiled it, as it
        names it: from the raw code, or the transformed code and the execution count."""
        return str(self.shell.compile.get_code_name(code, self.shell.transform_cell(code),
                                                    self.shell.execution_count))


def _share(result: Any) -> None:
    """Send the profile to the sidebar's timeline view (through the provisioner), if any."""
    from harp_jupyter.shim.session import get_session

    try:
        get_session().lease_source.share_profile(result.for_sidebar())
    except Exception:  # the notebook already shows it; the sidebar copy is a nicety
        pass


def _show_lease_notes(info: Any = None) -> None:
    """pre_run_cell: what happened to the GPU since the last cell (reclaimed while idle)."""
    show_pending()


def load_ipython_extension(ipython: Any) -> None:
    from harp_jupyter import torch_hook

    torch_hook.install()  # device="harp" with no import, once the notebook imports torch
    ipython.register_magics(HarpMagics)
    ipython.events.register("pre_run_cell", _show_lease_notes)
