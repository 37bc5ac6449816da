"""host_elimination on graphs whose device is not the CPU. This machine has no GPU and on a CPU ``.cpu()`` is a
no-op, so these are structural checks of the rule on functional ATen graphs with fake CUDA values (FakeTensor
needs no CUDA); what runs on a GPU is exercised there by the same rule."""

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

import kvpass

aten = torch.ops.aten
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


class Builder:
    """A functional ATen graph with fake values: ``x = b.op(target, *args, **kwargs)``."""

    def __init__(self):
        self.mode = FakeTensorMode()
        self.graph = torch.fx.Graph()

    def input(self, name, *shape, device=CUDA, dtype=torch.float32):
        node = self.graph.placeholder(name)
        with self.mode:
            node.meta["val"] = torch.empty(*shape, device=device, dtype=dtype)
        return node

    def op(self, target, *args, **kwargs):
        node = self.graph.call_function(target, args, kwargs)
        val = lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else [val(x) for x in a] if isinstance(a, list) else a  # noqa: E731
        with self.mode:
            node.meta["val"] = target(*[val(a) for a in args], **kwargs)
        return node

    def module(self, *outputs):
        self.graph.output(tuple(outputs))
        return torch.fx.GraphModule(torch.nn.Module(), self.graph)


def transfers(gm):
    return [n for n in gm.graph.nodes if n.target is aten._to_copy.default and "device" in n.kwargs]


def rewrite(gm):
    return kvpass.rewrite(gm, patterns=["host_elimination"])


def test_pure_hop_through_a_host_pad_collapses():
    b = Builder()
    k = b.input("k", 2, 3, 4)
    host = b.op(aten._to_copy.default, k, device=CPU)
    padded = b.op(aten.constant_pad_nd.default, host, [0, 4], 0.0)
    back = b.op(aten._to_copy.default, padded, device=CUDA)
    gm = b.module(b.op(aten.mul.Tensor, back, 2.0))
    gm, report = rewrite(gm)
    assert report.counts["host_elimination"] == 1 and transfers(gm) == []
    (pad,) = [n for n in gm.graph.nodes if n.target is aten.constant_pad_nd.default]
    assert pad.args[0] is k and pad.meta["val"].device == CUDA


def test_history_from_a_host_buffer_keeps_one_transfer():
    """``cat([buf[:, :5], k.cpu()]).to(cuda)``: K's round trip goes, the buffer's history (host state) is moved."""
    b = Builder()
    k = b.input("k", 2, 3, 4)
    buf = b.input("buf", 2, 16, 4, device=CPU)
    hist = b.op(aten.slice.Tensor, buf, 1, 0, 5)
    cat = b.op(aten.cat.default, [hist, b.op(aten._to_copy.default, k, device=CPU)], 1)
    gm = b.module(b.op(aten._to_copy.default, cat, device=CUDA))
    gm, report = rewrite(gm)
    assert report.counts["host_elimination"] == 1
    (moved,) = transfers(gm)
    assert moved.args[0].target is aten.slice.Tensor and moved.args[0].args[0] is buf
    (cat,) = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    assert cat.args[0][1] is k and cat.meta["val"].device == CUDA


def test_host_side_int8_quantization_moves_to_the_device():
    b = Builder()
    k = b.input("k", 2, 3, 4)
    host = b.op(aten._to_copy.default, k, device=CPU)
    q = b.op(aten.clamp.default, b.op(aten.round.default, b.op(aten.div.Tensor, host, 0.05)), -128, 127)
    q8 = b.op(aten._to_copy.default, q, dtype=torch.int8)
    back = b.op(aten._to_copy.default, q8, device=CUDA)
    gm = b.module(b.op(aten.mul.Tensor, b.op(aten._to_copy.default, back, dtype=torch.float32), 0.05))
    gm, report = rewrite(gm)
    assert report.counts["host_elimination"] == 1 and transfers(gm) == []
    assert all(n.meta["val"].device == CUDA for n in gm.graph.nodes if n.op == "call_function")


def test_transcendental_on_the_host_stops_the_move():
    """``cos`` may round differently on another device's kernels: the value stays computed on the host."""
    b = Builder()
    k = b.input("k", 2, 3, 4)
    host = b.op(aten._to_copy.default, k, device=CPU)
    gm = b.module(b.op(aten._to_copy.default, b.op(aten.cos.default, host), device=CUDA))
    gm, report = rewrite(gm)
    assert report.counts["host_elimination"] == 0 and len(transfers(gm)) == 2


def test_dtype_change_on_the_way_is_kept():
    b = Builder()
    k = b.input("k", 2, 3, 4)
    host = b.op(aten._to_copy.default, k, device=CPU, dtype=torch.float16)
    back = b.op(aten._to_copy.default, host, device=CUDA, dtype=torch.float32)
    gm = b.module(b.op(aten.sub.Tensor, back, k))
    gm, report = rewrite(gm)
    assert report.counts["host_elimination"] == 1 and transfers(gm) == []
    casts = [n.kwargs.get("dtype") for n in gm.graph.nodes if n.target is aten._to_copy.default]
    assert casts == [torch.float16, torch.float32]  # the rounding to float16 stays


def _absmax_quantization(b, host, signed=False):
    """``np.clip(np.round(a / s), -128, 127).astype(np.int8)`` with ``s = np.abs(a).max(-1, keepdims=True) / 127``
    (``signed``: ``a.max(-1)`` instead, whose zero's sign may depend on the device's reduction order)."""
    red = b.op(aten.amax.default, host if signed else b.op(aten.abs.default, host), [-1], True)
    scale = b.op(aten.div.Tensor, red, 127.0)
    q = b.op(aten.clamp.default, b.op(aten.round.default, b.op(aten.div.Tensor, host, scale)), -128, 127)
    return b.op(aten._to_copy.default, q, dtype=torch.int8), scale


def test_host_int8_quantization_with_an_absmax_scale_moves_to_the_device():
    """Issue 12 item 9: the scale, the rounding and the cast all move; no transfer is left."""
    b = Builder()
    k = b.input("k", 2, 3, 4)
    q8, scale = _absmax_quantization(b, b.op(aten._to_copy.default, k, device=CPU))
    back = b.op(aten._to_copy.default, q8, device=CUDA)
    deq = b.op(aten.mul.Tensor, b.op(aten._to_copy.default, back, dtype=torch.float32),
               b.op(aten._to_copy.default, scale, device=CUDA))
    gm, report = rewrite(b.module(deq))
    assert report.counts["host_elimination"] == 2 and transfers(gm) == []
    assert all(n.meta["val"].device == CUDA for n in gm.graph.nodes if n.op == "call_function")
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.index(aten.round.default) < ops.index(aten.clamp.default)  # the user's order of rounding


def test_amax_of_a_signed_value_stays_on_the_host():
    """``a.max(-1)`` of signed values is left where the user computed it (only an absmax moves)."""
    b = Builder()
    k = b.input("k", 2, 3, 4)
    q8, scale = _absmax_quantization(b, b.op(aten._to_copy.default, k, device=CPU), signed=True)
    gm, report = rewrite(b.module(b.op(aten._to_copy.default, scale, device=CUDA)))
    assert report.counts["host_elimination"] == 0
    (amax,) = [n for n in gm.graph.nodes if n.target is aten.amax.default]
    assert amax.meta["val"].device == CPU
