"""Tensor frames: awkward tensors, zero-copy both ways, and every malformed input as a typed error."""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplbd import errors
from eplbd import proto



class Blob(msgspec.Struct, tag=True, tag_field="type", kw_only=True):
    """Test-only message with unconstrained tensor fields, to push every dtype and shape through."""

    t: torch.Tensor | None = None
    more: list[torch.Tensor] = []


def _address_range(buf) -> tuple[int, int]:
    arr = np.frombuffer(buf, dtype=np.uint8)  # numpy does not warn on read-only buffers
    return arr.ctypes.data, arr.ctypes.data + arr.nbytes


def _report(load: torch.Tensor) -> proto.LoadReport:
    return proto.LoadReport(rank=0, worker_id="w", epoch=0, first_step=0, seq=0, load=load)


def _reply(t: torch.Tensor | None) -> proto.RebalanceReply:
    return proto.RebalanceReply(plan_id=1, epoch=1, pushed=False, skipped=True, phy2log=t)


def _config(value) -> proto.SetConfigRequest:
    return proto.SetConfigRequest(key="k", value=value)


def _roundtrip(msg):
    frames = proto.Encoder().encode(msg)
    return frames, proto.Decoder().decode([bytes(f) for f in frames])


def _blob_roundtrip(blob: Blob, **decoder_kw):
    frames = proto.Encoder(message_types=(Blob,)).encode(blob)
    return frames, proto.Decoder(message_type=Blob, **decoder_kw).decode([bytes(f) for f in frames])


def _assert_tensor_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    # Bitwise, so that NaN and -0.0 count too.
    assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.detach().reshape(-1).contiguous().view(torch.uint8))


AWKWARD = {
    "bf16": torch.tensor([[1.5, -2.25], [float("nan"), -0.0]], dtype=torch.bfloat16),
    "fp16": torch.tensor([0.5, 65504.0], dtype=torch.float16),
    "fp32": torch.randn(3, 5),
    "fp64": torch.randn(2, 2, dtype=torch.float64),
    "int32": torch.arange(24, dtype=torch.int32).view(2, 3, 4),
    "int64": torch.arange(12, dtype=torch.int64).view(3, 4) - 6,
    "int16": torch.tensor([-32768, 32767], dtype=torch.int16),
    "int8": torch.tensor([-128, 127], dtype=torch.int8),
    "uint8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": torch.tensor([[True, False, True]]),
    "0d_int64": torch.tensor(42, dtype=torch.int64),
    "0d_bf16": torch.tensor(3.5, dtype=torch.bfloat16),
    "empty": torch.empty(0, dtype=torch.float32),
    "empty_3d_bf16": torch.empty(4, 0, 2, dtype=torch.bfloat16),
    "noncontig_T": torch.arange(48, dtype=torch.int64).view(4, 3, 4).transpose(0, 2),
    "noncontig_step_bf16": torch.arange(20, dtype=torch.bfloat16)[::3],
    "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
    "offset_view": torch.arange(40, dtype=torch.int16).view(2, 4, 5)[1:],
    "requires_grad": torch.ones(2, 3, requires_grad=True),
    "large": torch.randint(0, 2**31, (64, 61, 288), dtype=torch.int64),  # ~9 MiB
}


@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_tensor_round_trips_in_its_own_frame(name):
    t = AWKWARD[name]
    frames, out = _blob_roundtrip(Blob(t=t))
    assert len(frames) == 2
    _assert_tensor_equal(out.t, t.detach())


def test_frame_count_is_one_plus_number_of_tensors_in_field_order():
    ts = [AWKWARD["bf16"], AWKWARD["0d_int64"], AWKWARD["empty"], AWKWARD["bool"]]
    frames, out = _blob_roundtrip(Blob(t=AWKWARD["fp32"], more=ts))
    assert len(frames) == 1 + 1 + len(ts)
    assert len(frames[4]) == 0  # the empty tensor still has its frame: numbering never shifts
    _assert_tensor_equal(out.t, AWKWARD["fp32"])
    for a, b in zip(out.more, ts):
        _assert_tensor_equal(a, b)
    assert len(_blob_roundtrip(Blob())[0]) == 1


@pytest.mark.parametrize("name", ["int32", "large", "noncontig_T"])
def test_load_report_round_trips(name):
    t = AWKWARD[name]
    t = t if t.dim() == 3 else t.view(1, *t.shape)
    frames, out = _roundtrip(_report(t))
    assert len(frames) == 2
    _assert_tensor_equal(out.load, t)


def test_tensor_frame_is_the_tensors_own_storage():
    t = torch.arange(4 * 3 * 8, dtype=torch.int64).view(4, 3, 8)
    frames = proto.Encoder().encode(_report(t))
    lo, hi = _address_range(frames[1])
    assert lo == t.data_ptr() and hi - lo == t.numel() * t.element_size()


def test_non_contiguous_tensor_is_copied_once_and_sent():
    t = torch.arange(2 * 3 * 8, dtype=torch.int64).view(2, 3, 8)[:, :, ::2]
    frames, out = _roundtrip(_report(t))
    assert len(frames) == 2 and torch.equal(out.load, t) and out.load.is_contiguous()


def test_decoded_tensor_is_a_view_of_the_received_frame():
    t = torch.arange(5 * 2 * 8, dtype=torch.int32).view(5, 2, 8)
    frames = [bytes(f) for f in proto.Encoder().encode(_report(t))]
    out = proto.Decoder().decode(frames)
    lo, hi = _address_range(frames[1])
    assert lo <= out.load.data_ptr() and out.load.data_ptr() + out.load.numel() * 4 <= hi
    del frames  # the tensor keeps its buffer alive
    assert torch.equal(out.load, t)


def test_memoryview_and_bytearray_frames_decode():
    t = torch.arange(16, dtype=torch.int64).view(2, 8)
    frames = proto.Encoder().encode(_reply(t))
    out = proto.Decoder().decode([memoryview(bytes(frames[0])), bytearray(frames[1])])
    assert torch.equal(out.phy2log, t)


def test_frame_count_with_several_tensors_is_deterministic():
    plan = proto.Plan(plan_id=1, epoch=1, base_epoch=0, layers=[0], phy2log=torch.zeros(1, 4, dtype=torch.int64),
                      policy="p")  # fmt: skip
    reg = proto.Registered(epoch=1, phy2log=torch.ones(2, 4, dtype=torch.int64), plan=plan)
    frames, out = _roundtrip(reg)
    assert len(frames) == 3
    assert torch.equal(out.phy2log, reg.phy2log) and torch.equal(out.plan.phy2log, plan.phy2log)
    assert len(proto.Encoder().encode(proto.Registered(epoch=1))) == 1


# --- refusals on the sending side -------------------------------------------------------------------
def test_encoder_refuses_arbitrary_objects_instead_of_pickling():
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    for value in (Payload(), object(), np.zeros(3), lambda: 1):
        with pytest.raises(errors.InvalidArgumentError, match="never pickle"):
            proto.Encoder().encode(_config(value))


def test_decoder_never_unpickles():
    class Boom:
        def __reduce__(self):
            raise AssertionError("unpickled")  # pragma: no cover - must never run

    blob = pickle.dumps({"x": 1})
    # A pickle as the whole header frame is just garbage to msgpack ...
    with pytest.raises(errors.DecodeError):
        proto.Decoder().decode([blob])
    # ... and a pickle inside a value stays inert bytes.
    out = proto.Decoder().decode(proto.Encoder().encode(_config(blob)))
    assert out.value == blob and isinstance(out.value, bytes)


def test_encoder_refuses_unsupported_tensors():
    with pytest.raises(errors.InvalidArgumentError, match="complex64"):
        proto.Encoder().encode(_config(torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(errors.InvalidArgumentError, match="meta.*copy it to CPU"):
        proto.Encoder().encode(_config(torch.zeros(2, device="meta")))
    with pytest.raises(errors.InvalidArgumentError, match="sparse"):
        proto.Encoder().encode(_config(torch.eye(3).to_sparse()))
    with pytest.raises(errors.InvalidArgumentError, match="not a protocol message"):
        proto.Encoder().encode({"type": "Hello"})


@pytest.mark.gpu
def test_encoder_refuses_cuda_tensors():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(errors.InvalidArgumentError, match="cuda"):
        proto.Encoder().encode(_reply(torch.zeros(1, 4, dtype=torch.int64, device="cuda")))


def test_encoder_refuses_a_tensor_in_an_untyped_field():
    # It would encode, but the receiver would see a plain list and an orphaned frame.
    with pytest.raises(errors.InvalidArgumentError, match="SetConfigRequest has no tensor field"):
        proto.Encoder().encode(_config({"w": torch.zeros(2)}))


def test_encoder_is_reusable_after_a_failure():
    enc = proto.Encoder()
    with pytest.raises(errors.InvalidArgumentError):
        enc.encode(_config(object()))
    assert len(enc.encode(_reply(torch.zeros(1, 2, dtype=torch.int64)))) == 2


# --- malformed input on the receiving side -------------------------------------------------------
def _valid_frames() -> list[bytes]:
    return [bytes(f) for f in proto.Encoder().encode(_report(torch.arange(24, dtype=torch.int64).view(2, 3, 4)))]


def _header(message: dict, n_tensors: int = 1, version: int = 1) -> bytes:
    return msgspec.msgpack.encode([version, n_tensors, message])


def _report_header(ref: list, n_tensors: int = 1) -> bytes:
    return _header(
        {"type": "LoadReport", "rank": 0, "worker_id": "w", "epoch": 0, "first_step": 0, "seq": 0, "load": ref},
        n_tensors,
    )


def test_unknown_tag_names_the_tag():
    with pytest.raises(errors.UnknownMessageError, match="'Teleport'"):
        proto.Decoder().decode([_header({"type": "Teleport", "x": 1}, n_tensors=0)])


def test_missing_tag_is_a_decode_error():
    with pytest.raises(errors.DecodeError):
        proto.Decoder().decode([_header({"rank": 1}, n_tensors=0)])


def test_truncated_header():
    header, data = _valid_frames()
    for cut in (0, 1, 5, len(header) // 2, len(header) - 1):
        with pytest.raises(errors.DecodeError):
            proto.Decoder().decode([header[:cut], data])


def test_truncated_tensor_frame_names_dtype_shape_and_lengths():
    header, data = _valid_frames()
    with pytest.raises(errors.TensorFrameError, match=r"int64\[2, 3, 4\] needs 192 bytes but frame 1 has 100"):
        proto.Decoder().decode([header, data[:100]])


def test_too_many_frames():
    header, data = _valid_frames()
    with pytest.raises(errors.FrameCountError, match=r"declares 1 tensor frame\(s\), got 2"):
        proto.Decoder().decode([header, data, data])


def test_too_few_frames():
    header, _ = _valid_frames()
    with pytest.raises(errors.FrameCountError, match=r"declares 1 tensor frame\(s\), got 0"):
        proto.Decoder().decode([header])
    with pytest.raises(errors.FrameCountError, match="got 0 frames"):
        proto.Decoder().decode([])


def test_count_lies_about_references():
    ref = ["tensor", "int64", [1, 1, 1], 1]
    with pytest.raises(errors.FrameCountError, match="declares 2 tensor frame.*references 1"):
        proto.Decoder().decode([_report_header(ref, n_tensors=2), bytes(8), bytes(8)])
    with pytest.raises(errors.FrameCountError, match="references frame 3"):
        proto.Decoder().decode([_report_header(["tensor", "int64", [1, 1, 1], 3]), bytes(8)])
    two = {"type": "Registered", "epoch": 1, "phy2log": ["tensor", "int64", [1, 1], 1],
           "plan": {"type": "Plan", "plan_id": 1, "epoch": 1, "base_epoch": 0, "layers": [0], "policy": "p",
                    "phy2log": ["tensor", "int64", [1, 1], 1]}}  # fmt: skip
    with pytest.raises(errors.FrameCountError, match="more than one tensor"):
        proto.Decoder().decode([_header(two, n_tensors=2), bytes(8), bytes(8)])


def test_dtype_and_shape_not_matching_frame_length():
    with pytest.raises(errors.TensorFrameError, match=r"int32\[2, 3, 4\] needs 96 bytes but frame 1 has 192"):
        proto.Decoder().decode([_report_header(["tensor", "int32", [2, 3, 4], 1]), bytes(192)])
    with pytest.raises(errors.TensorFrameError, match=r"int64\[2, 3, 5\] needs 240 bytes but frame 1 has 192"):
        proto.Decoder().decode([_report_header(["tensor", "int64", [2, 3, 5], 1]), bytes(192)])


def test_unknown_dtype_string_is_named():
    with pytest.raises(errors.TensorFrameError, match="'complex64'"):
        proto.Decoder().decode([_report_header(["tensor", "complex64", [2, 3, 4], 1]), bytes(192)])
    with pytest.raises(errors.TensorFrameError, match="'torch.int64'"):
        proto.Decoder().decode([_report_header(["tensor", "torch.int64", [2, 3, 4], 1]), bytes(192)])


def test_bad_tensor_reference_is_a_decode_error():
    for ref in (["tensor", "int64", [-1, 3, 4], 1], ["tensor", "int64"], "tensor", {"dtype": "int64"},
                ["array", "int64", [1], 1], ["tensor", "int64", [1] * 17, 1]):  # fmt: skip
        with pytest.raises(errors.DecodeError):
            proto.Decoder().decode([_report_header(ref), bytes(8)])


def test_oversize_declared_tensor_is_refused_without_allocating():
    huge = ["tensor", "int64", [2**20, 2**20, 2**20], 1]  # 8 EiB declared
    with pytest.raises(errors.MessageTooLargeError, match=r"declares \d+ bytes, over the limit"):
        proto.Decoder().decode([_report_header(huge), bytes(8)])
    empty_but_wide = ["tensor", "int64", [0, 2**62, 2**62], 1]
    with pytest.raises(errors.MessageTooLargeError, match="dimension over"):
        proto.Decoder().decode([_report_header(empty_but_wide), b""])


def test_max_frame_bytes_limits_frames_and_tensors():
    header, data = _valid_frames()
    with pytest.raises(errors.MessageTooLargeError, match="frame 1 has 192 bytes, over the limit of 150"):
        proto.Decoder(max_frame_bytes=150).decode([header, data])
    with pytest.raises(errors.MessageTooLargeError, match="frame 0"):
        proto.Decoder(max_frame_bytes=10).decode([header, data[:8]])
    assert proto.Decoder(max_frame_bytes=192).decode([header, data]).load.shape == (2, 3, 4)
    with pytest.raises(errors.InvalidArgumentError):
        proto.Decoder(max_frame_bytes=0)


def test_incompatible_protocol_version():
    header, data = _valid_frames()
    bumped = msgspec.msgpack.encode([2, 1, msgspec.Raw(header[3:])])
    with pytest.raises(errors.VersionMismatchError, match="version 2.*speaks 1"):
        proto.Decoder().decode([bumped, data])


def test_bool_frame_with_invalid_bytes():
    header = _header({"type": "Blob", "t": ["tensor", "bool", [3], 1]})
    assert proto.Decoder(message_type=Blob).decode([header, b"\x00\x01\x01"]).t.tolist() == [False, True, True]
    with pytest.raises(errors.TensorFrameError, match="bool"):
        proto.Decoder(message_type=Blob).decode([header, b"\x00\x01\x02"])


def test_tensor_field_with_wrong_dtype_for_the_message_is_a_decode_error():
    header = _report_header(["tensor", "float32", [1, 1, 2], 1])
    with pytest.raises(errors.DecodeError, match="LoadReport.load"):
        proto.Decoder().decode([header, bytes(8)])


def test_non_buffer_frame_is_a_decode_error():
    with pytest.raises(errors.DecodeError, match="frame 0 is a str"):
        proto.Decoder().decode(["hello"])


# --- fuzzing: only ProtocolError subclasses ever come out -------------------------------------------
def _decode_or_protocol_error(frames):
    try:
        out = proto.Decoder(max_frame_bytes=1 << 20).decode(frames)
    except errors.ProtocolError:
        return
    assert isinstance(out, proto.MESSAGE_TYPES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.binary(max_size=300), extra=st.lists(st.binary(max_size=64), max_size=3))
def test_random_bytes_only_raise_protocol_errors(header, extra):
    _decode_or_protocol_error([header, *extra])


VALID = _valid_frames()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID[0]) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, len(VALID[0]))),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, len(VALID[0])), st.binary(min_size=1, max_size=9))),
    data_len=st.sampled_from([0, 8, 100, 192, 200]),
)
def test_mutated_valid_header_only_raises_protocol_errors(edits, cut, insert, data_len):
    header = bytearray(VALID[0])
    for pos, val in edits:
        header[pos] = val
    if insert is not None:
        header[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        header = header[:cut]
    _decode_or_protocol_error([bytes(header), VALID[1][:data_len].ljust(data_len, b"\x01")])
