"""The nvcc allow-list: options that only shape the user's own compile pass, the rest are refused
naming the option (gpu_agent/nvcc_options.py), through protocol.validate_call."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_agent import nvcc_options as N
from gpu_agent import protocol as P
from gpu_agent.errors import AgentError

#: options a pycuda user passes every day, each must pass as written
COMMON = [
    ["-O3"], ["-O0"], ["--use_fast_math"], ["-use_fast_math"], ["-lineinfo"], ["-G"], ["-g"],
    ["-std=c++17"], ["--std=c++20"], ["-std", "c++14"], ["-DN=4"], ["-DDEBUG"],
    ["-D", "BLOCK=256"], ["--define-macro=T=float"], ["-DF(x)=((x)*2)"], ["-UNDEBUG"],
    ["--maxrregcount=32"], ["-maxrregcount", "64"], ["-arch=sm_90"], ["-arch", "sm_80"],
    ["-code=sm_90,compute_90"], ["-gencode", "arch=compute_90,code=sm_90"],
    ["--generate-code=arch=compute_80,code=[sm_80,compute_80]"], ["--ftz=true"],
    ["-ftz=false"], ["--prec-div=false"], ["--prec-sqrt=false"], ["--fmad=true"],
    ["-Xptxas", "-v"], ["-Xptxas=-v,-O3"], ["--ptxas-options=--warn-on-spills"],
    ["-rdc=true", "-lcudadevrt"], ["--expt-relaxed-constexpr"], ["--extended-lambda"],
    ["-w"], ["-Wno-deprecated-gpu-targets"], ["--diag-suppress=177,550"], ["-m64"],
    ["-res-usage"], ["-O", "2"], ["--restrict"], ["-src-in-ptx"],
]

#: each could read or write the agent's files or run a program there
HOSTILE = [
    ["--pre-include", "/etc/shadow"], ["--pre-include=/etc/shadow"], ["-include", "/etc/passwd"],
    ["-Xcompiler", "-fplugin=/tmp/x.so"], ["--compiler-options=-wrapper,/bin/sh"], ["-I/"],
    ["-I", "/etc"], ["--include-path=/home"], ["-isystem", "/etc"], ["--output-directory", "/tmp"],
    ["-odir=/tmp"], ["-o", "/tmp/x"], ["--output-file=/tmp/x"], ["-ccbin", "/tmp/evil"],
    ["--compiler-bindir=/tmp"], ["--keep"], ["--keep-dir", "/tmp"], ["--linker-options=-T/x"],
    ["-Xlinker", "x"], ["-L/tmp"], ["-lcrypto"], ["-l", "m"], ["--cudart=shared"],
    ["--run"], ["-run"], ["--run-args", "x"], ["--options-file", "/etc/passwd"],
    ["-optf=/etc/passwd"], ["--dependency-output=/tmp/d"], ["-MF", "/tmp/d"],
    ["--library-path=/tmp"], ["--system-include=/etc"], ["-Xptxas", "--output-file=/tmp/x"],
    ["-Xptxas=-v,--output-file=/tmp/x"], ["-Xnvlink", "x"], ["--keep-device-functions"],
    ["-Xarchive", "x"], ["-O3; rm -rf /"], ["-std=c++17 -I/"], ["-Gx"], ["-lineinfo=1"],
    ["-arch", "sm_90 -I/"], ["-DX\n#include </etc/passwd>"], ["--threads", "0"], ["-E"],
    ["--preprocess"], ["--cubin"], ["--ptx"], ["--fatbin"], ["-c"], ["-Xptxas"],
    # nvcc runs its sub-tools through a shell: these ran `touch` with CUDA 13.0's nvcc
    ["-DX=$(touch /tmp/pwned)"], ["-DX=`touch /tmp/pwned`"], ["-D", "X=$(id)"],
    ["--define-macro=X=1\" ; id ; echo \""], ["-DX=a\\b"], ["-DX=1 -include /etc/passwd"],
    ["-DX='a'"], ["-DX=a;id"], ["-DX=a|id"], ["-DX=a&id"], ["-DX=a>f"],
]


@pytest.mark.parametrize("options", COMMON, ids=" ".join)
def test_common_options_pass(options: list[str]) -> None:
    assert N.check_options(options, "module_source") == options


@pytest.mark.parametrize("options", HOSTILE, ids=lambda o: " ".join(o).replace("\n", "\\n"))
def test_hostile_options_are_refused_naming_the_option(options: list[str]) -> None:
    with pytest.raises(AgentError) as caught:
        N.check_options(["-O3", *options], "module_source")
    assert caught.value.kind == "ProtocolError"
    message = str(caught.value)
    assert message.startswith("module_source: nvcc option ")
    assert options[0][:2] in message[:32]  # names the refused option first
    assert "is not allowed" in message or "needs a value" in message


def test_refusal_lists_what_is_allowed() -> None:
    with pytest.raises(AgentError) as caught:
        N.check_options(["--pre-include=/etc/shadow"], "module_source")
    assert "'--pre-include=/etc/shadow' is not allowed" in str(caught.value)
    for allowed in ("-O0", "--use_fast_math", "-lineinfo", "-std", "--maxrregcount", "-D"):
        assert allowed in str(caught.value)


@pytest.mark.parametrize("value", [None, "sm_90", "sm_80", "compute_90", "sm_90a", "sm_100f"])
def test_arch_targets(value: str | None) -> None:
    assert N.check_target(value, "arch", "x") == value


@pytest.mark.parametrize("value", ["sm_90 -I/", "-I/", "/bin/sh", "sm_9", "sm_90,--run", 90])
def test_bad_arch_targets(value: Any) -> None:
    with pytest.raises(AgentError, match="is not a GPU target"):
        N.check_target(value, "arch", "x")


def test_code_may_list_targets_but_not_options() -> None:
    assert N.check_target("sm_90,compute_90", "code", "x") == "sm_90,compute_90"
    with pytest.raises(AgentError, match="not a GPU target"):
        N.check_target("sm_90,-run", "code", "x")


def module_source(options: list[str], arch: Any = None, code: Any = None,
                  include_dirs: Any = None) -> list[Any]:
    return ["module_source", 1, "__global__ void k() {}", options, False, arch, code,
            include_dirs or []]


@pytest.mark.parametrize("call", [
    module_source(["-I/etc"]),
    module_source([], arch="sm_90 --run"),
    module_source([], code="compute_90 -ccbin /tmp"),
    module_source([], include_dirs=["/etc"]),
    module_source([], include_dirs=["."]),
    ["module_link", 1, [["source", "x", ["--pre-include=/etc/shadow"], "a.cu"]], b"", {}],
    ["module_link", 1, [["source", "x", [], "a.cu"]], b"", {"include_dirs": ["/"]}],
    ["module_link", 1, [["source", "x", [], "a.cu"]], b"", {"arch": "-I/"}],
    ["module_link", 1, [["source", "x", [], "a.cu"]], b"", {"nvcc": "/bin/sh"}],
    ["module_link", 1, [["source", "x", [], "a.cu"]], b"", {"no_extern_c": 1}],
    ["elementwise_new", 1, "float *x", "x[i] = 0", "k", {"options": ["-Xcompiler=-B/tmp"]}],
    ["elementwise_new", 1, "float *x", "x[i] = 0", "k", {"options": "-O3"}],
    ["reduction_new", 1, "<f4", "0", "a+b", "x[i]", "float *x", {"options": ["-L/tmp"]}],
    ["array", "scan", [1, "<f4", [4], [4]], [[1, "<f4", [4], [4]]],
     {"options": ["--run"]}, None],
])
def test_validate_call_checks_every_nvcc_input(call: list[Any]) -> None:
    with pytest.raises(P.ProtocolError.__mro__[1]) as caught:
        P.validate_call(call)
    assert caught.value.kind == "ProtocolError"


def test_validate_call_passes_allowed_compiles() -> None:
    P.validate_call(module_source(["-O3", "--use_fast_math", "-DN=4"], arch="sm_90"))
    P.validate_call(["module_link", 1, [["source", "x", ["-rdc=true", "-lcudadevrt"], "a.cu"],
                                        ["stdlib", "cudadevrt"]], b"",
                     {"no_extern_c": True, "arch": "sm_90", "include_dirs": []}])
    P.validate_call(["elementwise_new", 1, "float *x", "x[i] = 0", "k",
                     {"options": ["-lineinfo"], "preamble": ""}])
