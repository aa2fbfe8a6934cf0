"""Context limits as a user sets them (issue 12): run with local pycuda and through the shim
(harp run); the JSON written to argv[1] must agree. A kernel that mallocs on the device after
the heap was raised, and printf with a larger FIFO, show the limits took effect."""

import json
import sys

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv
from pycuda.compiler import SourceModule

out: dict[str, object] = {}
names = ["STACK_SIZE", "PRINTF_FIFO_SIZE", "MALLOC_HEAP_SIZE", "DEV_RUNTIME_SYNC_DEPTH",
         "DEV_RUNTIME_PENDING_LAUNCH_COUNT"]


def limits() -> dict[str, object]:
    """Each limit's value, or the error class its query raised (CUDA may not support a limit
    on this GPU: the shim must raise the same)."""
    found: dict[str, object] = {}
    for name in names:
        try:
            found[name] = drv.Context.get_limit(getattr(drv.limit, name))
        except drv.Error as e:
            found[name] = type(e).__name__
    return found


out["defaults"] = limits()

MiB = 1 << 20
drv.Context.set_limit(drv.limit.MALLOC_HEAP_SIZE, 64 * MiB)
drv.Context.set_limit(drv.limit.STACK_SIZE, 4096)
drv.Context.set_limit(drv.limit.PRINTF_FIFO_SIZE, 4 * MiB)
drv.Context.set_limit(drv.limit.DEV_RUNTIME_PENDING_LAUNCH_COUNT, 4096)
out["set"] = limits()

module = SourceModule("""
__global__ void grab(int *ok, size_t nbytes)
{
    char *p = (char *) malloc(nbytes);
    ok[threadIdx.x] = p != 0;
    if (p) { p[nbytes - 1] = 1; free(p); }
}
""")
ok = np.zeros(4, np.int32)
module.get_function("grab")(drv.Out(ok), np.uintp(32 * MiB), block=(1, 1, 1), grid=(1, 1))
out["heap_malloc_32MiB"] = ok[:1].tolist()  # fits only in the raised 64 MiB heap

with open(sys.argv[1], "w") as f:
    json.dump(out, f, sort_keys=True)
