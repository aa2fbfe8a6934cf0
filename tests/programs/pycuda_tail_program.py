"""Issue 12's tail, as a user writes it: run with local pycuda and through the shim (harp run),
the results saved to argv[1] (an .npz) must agree. Each part's failure is saved as text, not
raised, so one missing feature does not hide the others."""

import sys
import traceback

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv
import pycuda.gpuarray as gpuarray

results: dict[str, np.ndarray] = {}
errors: dict[str, str] = {}


def part(name):
    def run(fn):
        try:
            fn()
        except Exception:
            errors[name] = traceback.format_exc()
        return fn
    return run


@part("curand")
def _curand():
    from pycuda import curandom

    np.random.seed(1234)
    for kind in ("XORWOW", "MRG32k3a", "Sobol32", "Sobol64", "ScrambledSobol32",
                 "ScrambledSobol64"):
        gen = getattr(curandom, f"{kind}RandomNumberGenerator")()
        dtypes = [np.float32, np.float64]
        for dtype in dtypes:
            results[f"{kind}_uniform_{np.dtype(dtype).name}"] = gen.gen_uniform(1000, dtype).get()
            results[f"{kind}_normal_{np.dtype(dtype).name}"] = gen.gen_normal(1000, dtype).get()
            results[f"{kind}_normal_odd_{np.dtype(dtype).name}"] = gen.gen_normal(1001,
                                                                                   dtype).get()
            results[f"{kind}_lognormal_{np.dtype(dtype).name}"] = gen.gen_log_normal(
                1000, dtype, 1.0, 0.5).get()
        results[f"{kind}_uint32"] = gen.gen_uniform(1000, np.uint32).get()
        results[f"{kind}_poisson"] = gen.gen_poisson(1000, np.uint32, 13.0).get()
        inplace = gpuarray.empty(1000, np.float32).fill(10)
        gen.fill_poisson(inplace)
        results[f"{kind}_poisson_inplace"] = inplace.get()
        gen.call_skip_ahead(1000)
        results[f"{kind}_after_skip"] = gen.gen_uniform(100, np.float32).get()
    unique = curandom.XORWOWRandomNumberGenerator(curandom.seed_getter_unique, offset=7)
    results["xorwow_seed_getter_unique"] = unique.gen_uniform(500, np.float32).get()
    results["rand"] = curandom.rand((100,), np.float32).get()


@part("struct_reduce")
def _struct_reduce():
    from pycuda.reduction import ReductionKernel
    from pycuda.tools import register_dtype

    preamble = """
    struct minmax_collector {
        float cur_min, cur_max;
        __device__ minmax_collector() { }
        __device__ minmax_collector(float a, float b) : cur_min(a), cur_max(b) { }
        __device__ minmax_collector(minmax_collector const volatile &s)
        : cur_min(s.cur_min), cur_max(s.cur_max) { }
        __device__ minmax_collector(minmax_collector const &s)
        : cur_min(s.cur_min), cur_max(s.cur_max) { }
        __device__ minmax_collector volatile &operator=(minmax_collector const &s) volatile
        { cur_min = s.cur_min; cur_max = s.cur_max; return *this; }
    };
    __device__ minmax_collector agg(minmax_collector a, minmax_collector b)
    { return minmax_collector(fminf(a.cur_min, b.cur_min), fmaxf(a.cur_max, b.cur_max)); }
    """
    dtype = np.dtype([("cur_min", np.float32), ("cur_max", np.float32)])
    register_dtype(dtype, "minmax_collector")
    red = ReductionKernel(dtype, neutral="minmax_collector(10000, -10000)",
                          reduce_expr="agg(a, b)", map_expr="minmax_collector(x[i], x[i])",
                          arguments="float *x", preamble=preamble)
    x = np.random.default_rng(2).random(20000).astype(np.float32)
    result = red(gpuarray.to_gpu(x)).get()
    results["struct_reduce"] = np.array([result["cur_min"], result["cur_max"]])
    results["struct_reduce_expected"] = np.array([x.min(), x.max()])


@part("vectors")
def _vectors():
    from pycuda.compiler import SourceModule

    mod = SourceModule("""
    __global__ void put(float3 v, float *out) { out[0] = v.x; out[1] = v.y; out[2] = v.z; }
    """)
    put = mod.get_function("put")
    put.prepare([gpuarray.vec.float3, np.intp])
    out = gpuarray.zeros(3, np.float32)
    put.prepared_call((1, 1, 1), (1, 1, 1), gpuarray.vec.make_float3(0.5, 1.5, 2.5), out.gpudata)
    stream = drv.Stream()
    put.prepared_async_call((1, 1), (1, 1, 1), stream, gpuarray.vec.make_float3(3, 4, 5),
                            out.gpudata)
    stream.synchronize()
    results["prepared_vector"] = out.get()
    filled = gpuarray.GPUArray(100, dtype=gpuarray.vec.float3)
    filled.fill(gpuarray.vec.make_float3(1.0, 2.0, 3.0))
    results["vector_fill"] = filled.get().view(np.float32)
    results["vector_zeros"] = gpuarray.zeros(10, gpuarray.vec.int4).get().view(np.int32)


@part("dynamic")
def _dynamic():
    from pycuda.compiler import DynamicModule, DynamicSourceModule

    source = """
    __global__ void child(int *out, int base) { out[base + threadIdx.x] = base + threadIdx.x; }
    __global__ void parent(int *out) { child<<<1, 4>>>(out, 4 * threadIdx.x); }
    """
    mod = DynamicSourceModule(source)
    out = gpuarray.zeros(16, np.int32)
    mod.get_function("parent")(out, block=(4, 1, 1), grid=(1, 1))
    results["dynamic_source"] = out.get()
    linked = DynamicModule()
    linked.add_source("extern __global__ void inner(int *o);\n"
                      "__global__ void outer(int *o) { inner<<<1, 8>>>(o); }",
                      nvcc_options=["-rdc=true", "-lcudadevrt"])
    linked.add_source("__global__ void inner(int *o) { o[threadIdx.x] = 7 * threadIdx.x; }",
                      nvcc_options=["-rdc=true", "-lcudadevrt"])
    linked.add_stdlib("cudadevrt")
    linked.link()
    out = gpuarray.zeros(8, np.int32)
    linked.get_function("outer")(out, block=(1, 1, 1), grid=(1, 1))
    results["dynamic_linked"] = out.get()


import json  # noqa: E402

np.savez(sys.argv[1], _errors=np.array(json.dumps(errors)), **results)
