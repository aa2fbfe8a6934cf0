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
