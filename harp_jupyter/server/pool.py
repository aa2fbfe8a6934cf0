"""The pool view: every configured GPU agent, asked for its status, summarised for the sidebar."""

from __future__ import annotations

import asyncio
from typing import Any

import zmq.asyncio

from harp_jupyter.server.config import HarpServer
from provisioner import background, local_agents
from provisioner.lease_client import LeaseClient
from provisioner.pool import checked_endpoints, resolve_agents


class PoolView:
    def __init__(self, config: HarpServer) -> None:
        self.config = config
        self._client: LeaseClient | None = None  # lives on the provisioners' background loop
        self._gpus: int | None = None

    def configured(self) -> list[str]:
        """The agents as configured (no DNS here: this runs on the server's event loop)."""
        try:
            return checked_endpoints(self.config.agents)
        except ValueError:
            return []

    def problem(self) -> dict[str, str] | None:
        """Why no GPU can be leased at all, with what to do; None when agents are configured."""
        try:
            endpoints = checked_endpoints(self.config.agents)
        except ValueError as e:
            return {"kind": "BadSetting", "message": f"HARP_AGENTS: {e}",
                    "hint": "set HARP_AGENTS=tcp://HOST:PORT,... and restart JupyterLab"}
        if endpoints == ["auto"]:
            if self._gpus is None:
                self._gpus = local_agents.count_gpus()
            if self._gpus == 0:
                return {"kind": "NoAgents", "message": "no GPU agents: HARP_AGENTS is not set "
                        "and this machine has no GPU to start local agents on",
                        "hint": "run harp-agent on a GPU machine (or an emulated one: harp-agent "
                        "--executor emulated) and start JupyterLab with HARP_AGENTS=tcp://HOST:PORT"
                        " (scripts/run does both)"}
        return None

    async def snapshot(self, paths: dict[str, str]) -> dict[str, Any]:
        problem = self.problem()
        if problem is not None:
            return {"agents": [], "summary": _summary([]), "problem": problem}
        try:
            endpoints = await background.run(resolve_agents(self.config.agents,
                                                            self.config.token))
        except (ValueError, local_agents.NoLocalGPU, OSError) as e:
            return {"agents": [], "summary": _summary([]),
                    "problem": {"kind": "NoAgents", "message": str(e), "hint": ""}}
        answers = await background.run(self._ask(endpoints))
        agents = [_agent(endpoint, answer, paths)
                  for endpoint, answer in zip(endpoints, answers, strict=True)]
        unreachable = [a["endpoint"] for a in agents if not a["reachable"]]
        problem = None
        if unreachable and len(unreachable) == len(agents):
            problem = {"kind": "AgentsUnreachable",
                       "message": f"no GPU agent answers ({', '.join(unreachable)})",
                       "hint": "check that harp-agent runs there and that this server can reach "
                               "it; kernels' GPU cells fail until one answers"}
        return {"agents": agents, "summary": _summary(agents), "problem": problem}

    async def parked_by_kernel(self, endpoints: list[str]) -> dict[str, dict[str, int]]:
        """endpoint -> {kernel id: bytes parked there}, from the status of each agent that
        answers (an agent that does not is left out: the caller keeps what it knew)."""
        answers = await background.run(self._ask(endpoints))
        found: dict[str, dict[str, int]] = {}
        for endpoint, answer in zip(endpoints, answers, strict=True):
            if isinstance(answer, BaseException):
                continue
            parked = (answer.get("leases") or {}).get("parked") or []
            found[endpoint] = {str(p["kernel_id"]): int(p.get("bytes") or 0)
                               for p in parked if isinstance(p, dict) and p.get("kernel_id")}
        return found

    async def _ask(self, endpoints: list[str]) -> list[dict[str, Any] | BaseException]:
        if self._client is None:
            self._client = LeaseClient(token=self.config.token,
                                       timeout=self.config.status_timeout,
                                       context=zmq.asyncio.Context.instance())
        client = self._client
        return await asyncio.gather(*(client.status(e, self.config.status_timeout)
                                      for e in endpoints), return_exceptions=True)


def _agent(endpoint: str, answer: dict[str, Any] | BaseException,
           paths: dict[str, str]) -> dict[str, Any]:
    if isinstance(answer, BaseException):
        return {"endpoint": endpoint, "reachable": False, "error": str(answer) or
                type(answer).__name__, "gpu": None, "emulated": None, "memory_total": None,
                "memory_used": None, "utilization": None, "holder": None, "queue": [],
                "parked_bytes": 0, "parked_count": 0}
    device = answer.get("device") or {}
    memory = answer.get("memory") or {}
    metrics = answer.get("metrics") or {}
    leases = answer.get("leases") or {}
    holder = leases.get("holder")
    parked = leases.get("parked") or []
    return {
        "endpoint": endpoint, "reachable": True, "error": None,
        "gpu": device.get("name"), "emulated": bool(answer.get("emulated")),
        "memory_total": memory.get("total"), "memory_used": memory.get("used"),
        "utilization": metrics.get("utilization_gpu"),
        "holder": None if not holder else {
            "kernel_id": holder.get("kernel_id"), "user": holder.get("user"),
            "since": holder.get("since"), "path": paths.get(str(holder.get("kernel_id")))},
        "queue": [{"kernel_id": q.get("kernel_id"), "user": q.get("user"),
                   "position": q.get("position"), "waiting_s": q.get("waiting_s"),
                   "path": paths.get(str(q.get("kernel_id")))}
                  for q in leases.get("queue") or []],
        "parked_bytes": sum(int(p.get("bytes") or 0) for p in parked),
        "parked_count": len(parked),
    }


def _summary(agents: list[dict[str, Any]]) -> dict[str, int]:
    reachable = [a for a in agents if a["reachable"]]
    held = sum(1 for a in reachable if a["holder"])
    return {"gpus": len(reachable), "free": len(reachable) - held, "held": held,
            "queued": sum(len(a["queue"]) for a in reachable),
            "unreachable": len(agents) - len(reachable)}
