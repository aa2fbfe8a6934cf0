"""The ``harp`` command: run pycuda scripts on remote GPU agents.

``harp run [--agents tcp://HOST:PORT[,...]] script.py [args...]`` runs the script as
``python script.py args...`` would (``sys.argv``, ``sys.path[0]``, ``__main__``, its exit code),
with ``pycuda.*`` imports resolved to the forwarding shim. ``harp run -m module [args...]`` runs a
module instead.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from types import TracebackType

_DESCRIPTION = "HARP for Jupyter: pycuda code on CPU machines, run on remote GPU agents."

_RUN_EPILOG = """\
The agents come from --agents or else HARP_AGENTS (the deprecated HARP_AGENT is still read, with a
warning). HARP_AGENT_TIMEOUT (seconds, default 10) bounds how long a sync point waits for an
agent that stopped answering; HARP_TOKEN is sent to the agents.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harp", description=_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run", help="run a pycuda script on a GPU agent",
        description="Run a Python script (or -m module) with pycuda forwarded to a GPU agent.",
        epilog=_RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--agents", "--agent", dest="agents", metavar="tcp://HOST:PORT[,...]",
                     help="the GPU agents to lease from, a comma list (default: $HARP_AGENTS; "
                          "--agent is the same option)")
    run.add_argument("-m", dest="module", metavar="MODULE",
                     help="run a library module as a script, like python -m")
    run.add_argument("script", nargs="?", help="the script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    if options.command != "run":
        parser.print_help(sys.stderr)
        return 2
    if options.module is None and options.script is None:
        parser.error("run: a script (or -m MODULE) is required")
    return run(options.script, options.args, agents=options.agents, module=options.module)


def configured_agents(agents: str | None) -> str | None:
    """The agents to use: ``agents`` (the option), else $HARP_AGENTS, else the deprecated
    $HARP_AGENT with one warning line; None when none is set (the first GPU call then says
    how to set one)."""
    if agents and agents.strip():
        return agents.strip()
    if os.environ.get("HARP_AGENTS", "").strip():
        return os.environ["HARP_AGENTS"].strip()
    deprecated = os.environ.get("HARP_AGENT", "").strip()
    if deprecated:
        print(f"harp run: HARP_AGENT is deprecated: set HARP_AGENTS={deprecated} instead",
              file=sys.stderr)
        return deprecated
    return None


def run(script: str | None, args: list[str], *, agents: str | None = None,
        module: str | None = None) -> int:
    """Run ``script`` (or ``module``) with the shim active; its exit status."""
    from harp_jupyter.shim import activate

    chosen = configured_agents(agents)
    if chosen:
        os.environ["HARP_AGENTS"] = chosen  # child Python processes lease from the same pool
        endpoints = [e.strip() for e in chosen.split(",") if e.strip()]
        # one agent: the session talks to it directly; several: it picks from HARP_AGENTS
        activate(agent=endpoints[0] if len(endpoints) == 1 else None)
    else:
        activate()
    from harp_jupyter import torch_hook

    torch_hook.install()
    if module is not None:
        if script is not None:
            args = [script, *args]
        sys.argv = [module, *args]
        sys.path.insert(0, os.getcwd())
        target, runner = module, runpy.run_module
    else:
        assert script is not None
        if not os.path.exists(script):
            print(f"harp run: can't open file {script!r}: no such file", file=sys.stderr)
            return 2
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        target, runner = script, runpy.run_path
    try:
        runner(target, run_name="__main__", **({"alter_sys": True} if module else {}))
    except SystemExit as e:
        return _exit_status(e)
    except KeyboardInterrupt:
        traceback.print_exception(*sys.exc_info()[:2], _user_traceback(sys.exc_info()[2]))
        return 130
    except BaseException as e:
        traceback.print_exception(type(e), e, _user_traceback(e.__traceback__))
        return 1
    finally:
        _close_session()
    return 0


def _user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """Drop the frames of this module and runpy, so the traceback starts in the user's code."""
    here = os.path.abspath(__file__)
    while tb is not None and (tb.tb_frame.f_globals.get("__name__") == "runpy"
                              or os.path.abspath(tb.tb_frame.f_code.co_filename) == here):
        tb = tb.tb_next
    return tb


def _exit_status(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _close_session() -> None:
    from harp_jupyter.shim.session import reset_session

    try:
        reset_session()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
