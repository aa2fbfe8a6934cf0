"""pycuda.curandom's cuRAND generators on the agent (ops curand_new, curand_call, curand_free).

The agent's pycuda builds the generator (its kernels, its launch shape), so the numbers are
pycuda's. Two things differ from a generator in the user's process: the state lives in session
memory the client allocated (it parks and moves with the session; the generator is pointed at it
for each call), and the seeds of a pseudo-random generator are drawn by the client, with the
call pycuda makes there (NumPy's global generator, or the user's ``seed_getter``), and sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycuda.curandom as curandom
import pycuda.driver as cuda
import pycuda.gpuarray as gpuarray

from gpu_agent.context_limits import ContextLimits
from gpu_agent.errors import AgentError

_PSEUDO = ("XORWOW", "MRG32k3a")
#: Sobol kinds: direction vector set, dtype and the scramble constants' function (scrambled)
_SOBOL: dict[str, tuple[str, Any, str | None]] = {
    "Sobol32": ("VECTOR_32", np.uint32, None),
    "Sobol64": ("VECTOR_64", np.uint64, None),
    "ScrambledSobol32": ("SCRAMBLED_VECTOR_32", np.uint32, "generate_scramble_constants32"),
    "ScrambledSobol64": ("SCRAMBLED_VECTOR_64", np.uint64, "generate_scramble_constants64"),
}
#: pycuda's own stack limit while a generator initialises (curand_init's scratch space)
_INIT_STACK = 1 << 14
#: device bytes each generator needs while it is set up, besides its state: its seed
#: (pseudo-random kinds) or its direction vectors and scramble constant (Sobol kinds)
_SETUP_BYTES = {"XORWOW": 4, "MRG32k3a": 4, "Sobol32": 32 * 4, "Sobol64": 64 * 8,
                "ScrambledSobol32": 32 * 4 + 4, "ScrambledSobol64": 64 * 8 + 8}


class DevicePointer(int):
    def free(self) -> None:
        return None


@dataclass
class Generator:
    kind: str
    rng: Any  # the pycuda generator
    state_bytes: int

    @property
    def count(self) -> int:
        return int(self.rng.block_count * self.rng.generators_per_block)


def _user_error(what: str, error: Exception) -> AgentError:
    return AgentError("LogicError", f"{what}: {type(error).__name__}: {error}")


def new_generator(kind: str, limits: ContextLimits, most_generators: int) -> Generator:
    """pycuda's generator of ``kind``. Its constructor sets up a state of its own (never used
    again: the client's state is in session memory), with seeds or direction vectors and the
    stack raised; that memory is outside the slot's chunks, so it counts against the slot while
    it is held. How many generators there are is known only once pycuda built the module: the
    count reserved is the most there can be, one per thread of a block on every multiprocessor
    (``most_generators``)."""
    from pycuda.characterize import sizeof

    cls = getattr(curandom, f"{kind}RandomNumberGenerator")
    state_size = int(sizeof(f"curandState{kind}", "#include <curand_kernel.h>"))
    scratch = (most_generators * (state_size + _SETUP_BYTES[kind])
               + limits.stack_scratch(_INIT_STACK))
    with limits.scratch(scratch, f"setting up a cuRAND {kind} generator"):
        if kind in _PSEUDO:
            # seeded with zeros: the client's seeds come with its init call; freed on return
            rng = cls(seed_getter=lambda n: gpuarray.zeros(n, np.int32))
        else:
            rng = cls()
        rng._state = None  # frees the constructor's own state
    state_bytes = int(rng.block_count * rng.generators_per_block * state_size)
    return Generator(kind, rng, state_bytes)


def call(generator: Generator, method: str, state: int, state_bytes: int, params: list[Any],
         stream: Any, view: Callable[[list[Any]], Any], limits: ContextLimits) -> None:
    if state_bytes != generator.state_bytes:
        raise AgentError("LogicError", f"curand_call: the state of a {generator.kind} generator "
                         f"is {generator.state_bytes} bytes, not {state_bytes}")
    rng = generator.rng
    rng._state = DevicePointer(state)
    args = [view(p) if isinstance(p, list) else p for p in params]
    try:
        if method == "init":
            setup = 0 if generator.kind in _PSEUDO else _SETUP_BYTES[generator.kind]
            with limits.scratch(generator.count * setup + limits.stack_scratch(_INIT_STACK),
                                f"initialising a cuRAND {generator.kind} generator"):
                _init(generator, args, stream)
        elif method.startswith("fill_"):
            getattr(rng, method)(*args, stream=stream)
        else:
            function = getattr(rng, f"call_{method}", None)
            if function is None:
                raise AgentError("LogicError", f"a {generator.kind} generator has no "
                                 f"call_{method}")
            function(*args, stream=stream)
    except (NotImplementedError, TypeError, ValueError, IndexError) as e:
        raise _user_error(f"{generator.kind}RandomNumberGenerator.{method}", e) from None
    finally:
        rng._state = None


def _init(generator: Generator, args: list[Any], stream: Any) -> None:
    """What pycuda's constructor does after compiling: run the module's ``prepare`` kernel
    over every generator, with the client's seeds or the default Sobol vectors."""
    rng, count = generator.rng, generator.count
    offset = args[0] if args else None
    if type(offset) is not int or offset < 0:
        raise AgentError("LogicError", "curand init: the offset must be a non-negative int")
    if generator.kind in _PSEUDO:
        seeds = args[1] if len(args) == 2 else None
        if not (isinstance(seeds, gpuarray.GPUArray) and seeds.dtype == np.int32
                and seeds.size == count and seeds.flags.c_contiguous):
            raise AgentError("LogicError", f"seed must be GPUArray of integers of right length "
                             f"({count} int32 seeds, one per generator)")
        pointers = [seeds.gpudata]
        signature = "PnPn"
    else:
        vector_set, _, scramble = _SOBOL[generator.kind]
        vectors = curandom.generate_direction_vectors(
            count, getattr(curandom.direction_vector_set, vector_set))
        pointers = [vectors.gpudata]
        signature = "PnPn"
        if scramble is not None:
            constants = getattr(curandom, scramble)(count)
            pointers.append(constants.gpudata)
            signature = "PnPPn"
    prepare = rng.module.get_function("prepare")
    prepare.prepare(signature)
    previous = cuda.Context.get_limit(cuda.limit.STACK_SIZE)
    cuda.Context.set_limit(cuda.limit.STACK_SIZE, max(previous, _INIT_STACK))
    try:
        prepare.prepared_async_call((rng.block_count, 1), (rng.generators_per_block, 1, 1),
                                    stream, rng.state, count, *pointers, offset)
        if stream is None:
            cuda.Context.synchronize()  # the vectors above are freed when this returns
        else:
            stream.synchronize()
    finally:
        cuda.Context.set_limit(cuda.limit.STACK_SIZE, previous)
