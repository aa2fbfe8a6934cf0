"""The agent's one error type.

Every refusal and failure on the agent side is an ``AgentError`` whose ``kind`` is one of
``protocol.ERROR_KINDS`` (the client turns the kind into the matching pycuda exception) and whose
``code`` is a CUDA error name or a data-tree code where one applies. The message is written for
the person at the notebook: what happened and what to do.
"""

from __future__ import annotations


class AgentError(Exception):
    """A failed request or call: ``kind`` from protocol.ERROR_KINDS, ``code`` optional."""

    def __init__(self, kind: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code

    def to_wire(self, *, index: int | None = None, op: str | None = None) -> dict:
        return {"i": index, "op": op, "kind": self.kind, "msg": str(self), "code": self.code}
