"""Which nvcc options a client may send: the one allow-list, checked before anything compiles.

A client's options reach the agent's nvcc (module_source, module_link, elementwise_new,
reduction_new, the scan array function). nvcc options can read files on the agent
(``--pre-include``, ``-I``, ``--options-file``), write them (``-o``, ``--output-directory``,
``--keep-dir``) or run programs (``-ccbin``, ``-Xcompiler``, ``--run``), so every option must be
one this table names, with a value of the shape it allows; anything else is refused, naming the
option and what is allowed. pycuda adds its own (the target, ``-arch``/``-code``, ``-I`` of its
headers) after this check. The source itself is compiled in a sandbox (gpu_agent/nvcc_sandbox.py),
since its ``#include`` lines are resolved by the preprocessor whatever these options say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gpu_agent.errors import AgentError

#: GPU targets: sm_90, compute_90, sm_90a, sm_100f, lto_90 (and nvcc's named choices for -arch)
_GPU = r"(?:sm|compute|lto)_\d{2,3}[af]?"
_GPU_LIST = re.compile(rf"{_GPU}(?:,{_GPU})*")
_ARCH = re.compile(rf"{_GPU}|native|all|all-major")
_GENCODE = re.compile(rf"arch={_GPU},code=(?:{_GPU}|\[{_GPU}(?:,{_GPU})*\])")
#: nvcc runs its sub-tools through a shell, and ``-DX=$(cmd)`` or a backquote in a macro's
#: value runs ``cmd`` on the agent (seen with CUDA 13.0): values keep to characters no shell
#: treats specially
_MACRO = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\([A-Za-z0-9_,.]*\))?"
                    r"(?:=[A-Za-z0-9_.+\-*/%()=!~^:?\[\]]*)?")
_MACRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BOOL = re.compile(r"true|false")
_COUNT = re.compile(r"\d{1,4}")
_NUMBERS = re.compile(r"\d{1,6}(?:,\d{1,6})*")
_STD = re.compile(r"c\+\+(?:03|11|14|17|20|23)")
#: options nvcc passes on to ptxas (``-Xptxas -v``), each of them checked too
_PTXAS = re.compile(r"-v|--verbose|-O[0-3]|--opt-level=[0-3]|-warn-spills|--warn-on-spills"
                    r"|-warn-lmem-usage|--warn-on-local-memory-usage|-warn-double-usage"
                    r"|--warn-on-double-precision-use|-maxrregcount=\d{1,4}"
                    r"|--maxrregcount=\d{1,4}|-dlcm=c[ag]|--def-load-cache=c[ag]"
                    r"|--allow-expensive-optimizations=(?:true|false)|-Werror|--warning-as-error")


@dataclass(frozen=True)
class Allowed:
    """One allowed nvcc option: its spellings and, when it takes a value, the value's shape
    (matched whole; a value may be attached with ``=``, or glued for one-letter options:
    ``-DN=4``, or follow as the next option)."""

    names: tuple[str, ...]
    value: re.Pattern[str] | None = None
    shown: str = ""  # how the value is shown in the refusal's list
    #: nvcc splits a value at commas and passes each piece on: check every piece
    split: bool = False


#: The allow-list. Everything here only changes how the user's own source is compiled.
ALLOWED: tuple[Allowed, ...] = (
    Allowed(("-O0", "-O1", "-O2", "-O3")),
    Allowed(("--optimize", "-O"), re.compile(r"[0-3]"), "0-3"),
    Allowed(("--use_fast_math", "-use_fast_math")),
    Allowed(("--ftz", "-ftz"), _BOOL, "true|false"),
    Allowed(("--prec-div", "-prec-div"), _BOOL, "true|false"),
    Allowed(("--prec-sqrt", "-prec-sqrt"), _BOOL, "true|false"),
    Allowed(("--fmad", "-fmad"), _BOOL, "true|false"),
    Allowed(("--extra-device-vectorization", "-extra-device-vectorization")),
    Allowed(("--restrict", "-restrict")),
    Allowed(("--generate-line-info", "-lineinfo")),
    Allowed(("--device-debug", "-G")),
    Allowed(("--debug", "-g")),
    Allowed(("--source-in-ptx", "-src-in-ptx")),
    Allowed(("--resource-usage", "-res-usage")),
    Allowed(("--std", "-std"), _STD, "c++03..c++23"),
    Allowed(("--define-macro", "-D"), _MACRO,
            "NAME[=value] (value: letters, digits and _.+-*/%()=!~^:?[])", split=True),
    Allowed(("--undefine-macro", "-U"), _MACRO_NAME, "NAME", split=True),
    Allowed(("--maxrregcount", "-maxrregcount"), _COUNT, "N"),
    Allowed(("--gpu-architecture", "-arch"), _ARCH, "sm_XY|compute_XY|native|all"),
    Allowed(("--gpu-code", "-code"), _GPU_LIST, "sm_XY,compute_XY"),
    Allowed(("--generate-code", "-gencode"), _GENCODE, "arch=compute_XY,code=sm_XY"),
    Allowed(("--relocatable-device-code", "-rdc"), _BOOL, "true|false"),
    Allowed(("-lcudadevrt",)),  # DynamicSourceModule's: the toolkit's device runtime by name
    Allowed(("--ptxas-options", "-Xptxas"), _PTXAS, "-v, -O3, --maxrregcount=N, ...",
            split=True),
    Allowed(("--extended-lambda", "-extended-lambda", "--expt-extended-lambda",
             "-expt-extended-lambda")),
    Allowed(("--expt-relaxed-constexpr", "-expt-relaxed-constexpr")),
    Allowed(("--disable-warnings", "-w")),
    Allowed(("-Wno-deprecated-gpu-targets", "-Wno-deprecated-declarations",
             "--Wno-deprecated-gpu-targets", "--Wno-deprecated-declarations", "-Wreorder",
             "--Wreorder", "-Wext-lambda-captures-this", "--Wext-lambda-captures-this")),
    Allowed(("--display-error-number", "-err-no", "--no-display-error-number", "-no-err-no")),
    Allowed(("--diag-suppress", "-diag-suppress", "--diag-warn", "-diag-warn", "--diag-error",
             "-diag-error"), _NUMBERS, "N[,N...]"),
    Allowed(("-m64", "--machine=64", "-m=64")),
)

_BY_NAME: dict[str, Allowed] = {name: a for a in ALLOWED for name in a.names}
#: most options a client may send to one compile (pycuda's own are added after)
MAX_OPTIONS = 256
MAX_OPTION_CHARS = 4096


def allowed_summary() -> str:
    """The allowed options as a refusal lists them."""
    parts = []
    for a in ALLOWED:
        spelled = "/".join(a.names)
        parts.append(f"{spelled} {a.shown}" if a.value is not None else spelled)
    return "; ".join(parts)


def _refuse(where: str, text: str) -> AgentError:
    return AgentError(
        "ProtocolError",
        f"{where}: nvcc option {text[:80]!r} is not allowed on a HARP agent (options that read "
        "or write the agent's files, name its directories or run programs there are refused). "
        f"Allowed: {allowed_summary()}")


def _split(option: str) -> tuple[str, str | None]:
    """``(name, attached value)`` of one option: ``--ftz=true``, ``-DN=4`` or ``-O3``."""
    name, sep, value = option.partition("=")
    if sep and name in _BY_NAME:  # --ftz=true, -arch=sm_90
        return name, value
    if option in _BY_NAME:
        return option, None
    for glued in ("-D", "-U", "-O"):  # one-letter options take their value glued on
        if option.startswith(glued) and len(option) > 2:
            return glued, option[2:]
    return option, None


def check_options(options: Any, where: str) -> list[str]:
    """``options`` (a list of nvcc options from a client) when every one is allowed, or
    ProtocolError naming the first that is not and listing what is allowed."""
    if (type(options) is not list or len(options) > MAX_OPTIONS
            or not all(type(o) is str and len(o) <= MAX_OPTION_CHARS for o in options)):
        raise AgentError("ProtocolError", f"{where}: nvcc options must be a list of at most "
                         f"{MAX_OPTIONS} strings of at most {MAX_OPTION_CHARS} characters")
    i = 0
    while i < len(options):
        name, value = _split(options[i])
        allowed = _BY_NAME.get(name)
        if allowed is None:
            raise _refuse(where, options[i])
        if allowed.value is None:
            if value is not None:
                raise _refuse(where, options[i])
        else:
            if value is None:  # the value is the next option: ["-Xptxas", "-v"]
                if i + 1 == len(options):
                    raise AgentError("ProtocolError",
                                     f"{where}: nvcc option {name} needs a value ({allowed.shown})")
                i += 1
                value = options[i]
            pieces = value.split(",") if allowed.split else [value]
            for piece in pieces:
                if not allowed.value.fullmatch(piece):
                    raise AgentError(
                        "ProtocolError", f"{where}: nvcc option {name} {value[:80]!r} is not "
                        f"allowed: its value must be {allowed.shown}")
        i += 1
    return options


def check_target(value: Any, what: str, where: str) -> str | None:
    """An ``arch`` (``sm_90``) or ``code`` (``sm_90,compute_90``) field, or ProtocolError."""
    if value is None:
        return None
    pattern = _ARCH if what == "arch" else _GPU_LIST
    if type(value) is not str or not pattern.fullmatch(value):
        raise AgentError("ProtocolError", f"{where}: {what} {str(value)[:80]!r} is not a GPU "
                         f"target (e.g. sm_90{', compute_90' if what == 'code' else ''})")
    return value


def check_include_dirs(value: Any, where: str) -> list[str]:
    """``include_dirs`` must be empty: it names directories on the agent, whose files a client
    may not read. pycuda's headers and the CUDA toolkit's are always on the include path."""
    if value in (None, []):
        return []
    raise AgentError("ProtocolError", f"{where}: include_dirs {_short(value)} is refused: it "
                     "would name directories on the agent's machine, whose files a client may "
                     "not read. pycuda's and the CUDA toolkit's headers are always on the path; "
                     "put your own headers' text in the source (or the kernel's preamble)")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


#: the keys of module_link's options map
LINK_OPTION_KEYS = ("no_extern_c", "arch", "code", "include_dirs")


def check_link_options(options: dict[str, Any], where: str = "module_link") -> None:
    unknown = sorted(set(options) - set(LINK_OPTION_KEYS))
    if unknown:
        raise AgentError("ProtocolError", f"{where}: unknown options {unknown} "
                         f"(known: {', '.join(LINK_OPTION_KEYS)})")
    if type(options.get("no_extern_c", False)) is not bool:
        raise AgentError("ProtocolError", f"{where}: option no_extern_c must be a bool")
    check_target(options.get("arch"), "arch", where)
    check_target(options.get("code"), "code", where)
    check_include_dirs(options.get("include_dirs"), where)


#: the ops whose arguments can reach nvcc (``array`` only for its ``scan`` function)
COMPILING_OPS = frozenset(("module_source", "module_link", "elementwise_new", "reduction_new",
                           "array"))


def check_call(name: str, args: list[Any]) -> None:
    """Check every nvcc input of a call whose op compiles CUDA C (types already checked by
    protocol.validate_call); other calls pass untouched."""
    if name == "module_source":
        check_options(args[2], name)
        check_target(args[4], "arch", name)
        check_target(args[5], "code", name)
        check_include_dirs(args[6], name)
    elif name == "module_link":
        check_link_options(args[3])
        for item in args[1]:
            if item[0] == "source":
                check_options(item[2], f"{name} source {item[3][:40]!r}")
    elif name in ("elementwise_new", "reduction_new"):
        options = args[-1].get("options")
        if options is not None:
            check_options(options, name)
    elif name == "array" and args[0] == "scan":
        options = args[3].get("options")
        if options is not None:
            check_options(options, "scan")
