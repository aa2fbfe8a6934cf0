import numpy as np
import pytest

from gpu_agent import protocol as P


def test_header_round_trip_with_frame_refs_and_complex() -> None:
    header = {"t": P.BATCH, "q": 3, "c": [["htod", 2**63, P.FrameRef(1), None],
                                          ["array", "fill", None, [1 + 2j], {}, None]]}
    decoded, frames = P.decode(P.encode(header, [b"payload"]))
    assert decoded == header and frames == [b"payload"]


@pytest.mark.parametrize("data", [b"", b"\xc1", P.pack_header([1]), P.pack_header({"t": 5})])
def test_garbage_headers_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        P.unpack_header(data)


def test_validate_call_names_what_is_wrong() -> None:
    assert P.validate_call(["memset", 0, 7, 4, 10, None]) == ("memset", [0, 7, 4, 10, None])
    with pytest.raises(P.ProtocolError, match="unknown operation 'nope'"):
        P.validate_call(["nope"])
    with pytest.raises(P.ProtocolError, match="takes 2 arguments, got 1"):
        P.validate_call(["alloc", 1])
    with pytest.raises(P.ProtocolError, match="argument 0 has the wrong type"):
        P.validate_call(["free", -1])
    with pytest.raises(P.ProtocolError, match="unknown array function"):
        P.validate_call(["array", "eval", None, [], {}, None])


def test_descriptor_extent_covers_negative_strides_and_empty_arrays() -> None:
    assert P.descriptor_extent([1000, "<f4", [3, 2], [8, 4]]) == (1000, 1024)
    assert P.descriptor_extent([1000, "<f8", [4], [-8]]) == (976, 1008)
    assert P.descriptor_extent([1000, "<f8", [0, 5], [40, 8]]) == (1000, 1000)
    assert P.descriptor_extent([1000, "<i4", [], []]) == (1000, 1004)


def test_module_link_inputs_are_validated() -> None:
    good = [["source", "__global__ void k() {}", ["-rdc=true"], "a.ptx"],
            ["data", "PTX", "b.ptx", 0, 10], ["stdlib", "cudadevrt"]]
    assert P.validate_call(["module_link", 1, good, b"x" * 10, {}])[0] == "module_link"
    for bad in ([], [["stdlib", "../../etc/passwd"]], [["stdlib", "a/b"]], [["stdlib", ""]],
                [["data", "ELF", "x", 0, 1]], [["data", "PTX", "x", -1, 1]],
                [["source", "s", "not a list", "n"]], [["source", "s", [], "n", "extra"]],
                [["exec", "rm -rf /"]], ["source"], [["stdlib", "cudadevrt"]] * 65):
        with pytest.raises(P.ProtocolError, match="module_link: argument 1"):
            P.validate_call(["module_link", 1, bad, b"", {}])
    assert "unknown input kind 'exec'" in (P.link_input_problem(["exec"]) or "")
    assert "cudadevrt" in (P.link_input_problem(["stdlib", "../x"]) or "")


def test_registered_dtypes_are_validated() -> None:
    assert P.registered_dtypes(None) == []
    pairs = P.registered_dtypes([["minmax", "[('lo', '<f4'), ('hi', '<f4')]"],
                                 ["ns::pair_t", "<i8"]])
    assert [name for name, _ in pairs] == ["minmax", "ns::pair_t"]
    assert pairs[0][1].names == ("lo", "hi")
    for bad in ("x", [["a b", "<f4"]], [["x;system()", "<f4"]], [["ok", "|O"]],
                [["ok", "<f4", 1]], [["ok", "__import__('os')"]], [["t", "<f4"]] * 65,
                [["x" * 129, "<f4"]]):
        with pytest.raises(P.ProtocolError, match="dtypes"):
            P.registered_dtypes(bad)


@pytest.mark.parametrize("index", [0, 1, 63, 64, 65, 4096])
def test_frame_references_round_trip_on_both_sides_of_the_encoding_cache(index: int) -> None:
    header = P.unpack_header(P.pack_header({"t": P.REPLY, "r": [[0, P.FrameRef(index)]]}))
    assert header["r"] == [[0, P.FrameRef(index)]]


@pytest.mark.parametrize("index", [0, 63, 64, 1000])
def test_frame_ref_is_a_frame_reference_of_that_index(index: int) -> None:
    assert P.frame_ref(index) == P.FrameRef(index)


def test_generated_argument_checks_agree_with_the_validators() -> None:
    # validate_call runs one generated function per op; it must accept exactly what the op's
    # validators accept, value by value, for every op of the registry
    samples = [None, 0, 1, -1, 1 << 64, (1 << 64) - 1, 2.5, True, "x", b"ab", bytearray(b"a"),
               [], [1], [1, 2, 3], [1, -2], [1, 2, 3, 4], ["a"], {}, {"k": 1}, P.FrameRef(1),
               ["f4", "<f4", [4], [4], 0]]
    for name, op in P.OPS.items():
        checks = op.args
        rng = np.random.default_rng(len(name))
        for _ in range(60):
            args = [samples[int(rng.integers(len(samples)))] for _ in checks]
            want = all(check(v) for check, v in zip(checks, args, strict=True))
            assert P._ARGUMENTS_VALID[name](args) is want, (name, args)
        assert P._ARGUMENTS_VALID[name]([None] * (len(checks) + 1)) is False
