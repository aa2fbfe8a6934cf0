"""harp tensors against local CPU torch: the same code on ``device="harp"`` (a real emulated agent,
CPU torch in its worker) gives what it gives on the CPU, through the shim's session and wire."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from harp_jupyter import shim  # noqa: E402
from harp_jupyter.shim.session import reset_session  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def harp(module_emulated_agent: Any) -> Iterator[Any]:
    import harp_jupyter.torch as harp_torch

    shim.activate(agent=module_emulated_agent.endpoint)
    try:
        yield harp_torch
    finally:
        reset_session()
        shim.deactivate()


def same(remote: Any, local: Any, **tolerance: float) -> None:
    assert remote.device.type == "harp"
    torch.testing.assert_close(remote.cpu(), local, **tolerance)


def test_creation_and_dtype_promotion(harp: Any) -> None:
    for make in (lambda d: torch.zeros(2, 3, device=d), lambda d: torch.ones(4, device=d),
                 lambda d: torch.full((2, 2), 7.5, device=d),
                 lambda d: torch.arange(10, device=d), lambda d: torch.eye(3, device=d),
                 lambda d: torch.linspace(0, 1, 5, device=d)):
        same(make("harp"), make("cpu"))
    a = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    b = torch.rand(2, 3, dtype=torch.float64)
    for op in (torch.add, torch.mul, torch.div, torch.maximum):
        same(op(a.to("harp"), b.to("harp")), op(a, b))
    same(a.to("harp") * 2.5, a * 2.5)
    same((a.to("harp") > 2), a > 2)
    assert (a.to("harp") + torch.tensor(1.5)).dtype == (a + torch.tensor(1.5)).dtype


def test_views_alias_their_base(harp: Any) -> None:
    local = torch.arange(24.0).reshape(4, 6)
    remote = local.to("harp")
    for view in (lambda t: t[1:3, ::2], lambda t: t.t(), lambda t: t[:, 2],
                 lambda t: t.view(6, 4)[1], lambda t: t.unsqueeze(0)[0, -1]):
        remote_view, local_view = view(remote), view(local)
        assert remote_view.stride() == local_view.stride()
        assert remote_view.storage_offset() == local_view.storage_offset()
        remote_view.mul_(-1)
        local_view.mul_(-1)
        same(remote, local)
    remote[0] = 100.0
    local[0] = 100.0
    remote[:, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    local[:, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    same(remote, local)
    index = torch.tensor([3, 0])
    same(remote[index.to("harp")], local[index])
    same(remote[remote > 10], local[local > 10])
    assert remote.sum(dim=0).tolist() == local.sum(dim=0).tolist()


def test_in_place_reductions_matmul_conv(harp: Any) -> None:
    torch.manual_seed(1)
    x, w = torch.randn(8, 5), torch.randn(5, 3)
    rx, rw = x.to("harp"), w.to("harp")
    rx.add_(1).clamp_(min=0)
    x.add_(1).clamp_(min=0)
    same(rx, x)
    same(rx @ rw, x @ w)
    for reduce in (lambda t: t.sum(), lambda t: t.mean(1), lambda t: t.max(0).values,
                   lambda t: t.argmax(1), lambda t: t.std(), lambda t: t.softmax(-1),
                   lambda t: t.cumsum(0), lambda t: t.norm()):
        same(reduce(rx), reduce(x))
    image, kernel = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3)
    same(torch.nn.functional.conv2d(image.to("harp"), kernel.to("harp"), padding=1),
         torch.nn.functional.conv2d(image, kernel, padding=1), rtol=1e-4, atol=1e-4)
    assert rx.sum().item() == pytest.approx(x.sum().item(), rel=1e-6)
    assert torch.nonzero(rx > 1).cpu().tolist() == torch.nonzero(x > 1).tolist()


def test_seeded_random_matches_local(harp: Any) -> None:
    torch.manual_seed(1234)
    remote = [torch.randn(3, 4, device="harp"), torch.rand(5, device="harp"),
              torch.randint(0, 10, (6,), device="harp")]
    torch.manual_seed(1234)
    local = [torch.randn(3, 4), torch.rand(5), torch.randint(0, 10, (6,))]
    for r, loc in zip(remote, local, strict=True):
        same(r, loc)


def mlp() -> Any:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def small_cnn() -> Any:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("make", [mlp, small_cnn])
def test_autograd_matches_local(harp: Any, make: Any) -> None:
    torch.manual_seed(0)
    local = make()
    remote = make()
    remote.load_state_dict(local.state_dict())
    remote.to("harp")
    x = torch.randn(4, 6) if make is mlp else torch.randn(4, 1, 8, 8)
    target = torch.tensor([0, 1, 1, 0]) if make is mlp else torch.tensor([0, 1, 2, 0])
    loss_local = torch.nn.functional.cross_entropy(local(x), target)
    loss_remote = torch.nn.functional.cross_entropy(remote(x.to("harp")), target.to("harp"))
    loss_local.backward()
    loss_remote.backward()
    assert loss_remote.item() == pytest.approx(loss_local.item(), rel=1e-5)
    for (name, p_local), p_remote in zip(local.named_parameters(), remote.parameters(),
                                         strict=True):
        assert isinstance(p_remote, torch.nn.Parameter), name
        same(p_remote.grad, p_local.grad, rtol=1e-4, atol=1e-5)


def train(model: Any, optimizer: Any, device: str, steps: int,
          generator: Any = None) -> list[float]:
    generator = generator or torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=generator)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_a_small_cnn_matches_local(harp: Any, optimizer: str) -> None:
    torch.manual_seed(3)
    local = small_cnn()
    remote = small_cnn()
    remote.load_state_dict(local.state_dict())
    remote.to("harp")

    def make(model: Any) -> Any:
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    losses_local = train(local, make(local), "cpu", 5)
    losses_remote = train(remote, make(remote), "harp", 5)
    assert losses_remote == pytest.approx(losses_local, rel=1e-4, abs=1e-6)
    saved = {k: v.cpu() for k, v in remote.state_dict().items()}
    for key, value in local.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5)


def test_device_module_and_save(harp: Any, tmp_path: Any) -> None:
    assert torch.harp.is_available() and torch.harp.device_count() == 1
    x = torch.ones(256, 256, device="harp")
    torch.harp.synchronize()
    assert torch.harp.memory_allocated() >= 256 * 256 * 4
    assert "emulated" in torch.harp.get_device_name()
    assert x.is_harp
    path = tmp_path / "state.pt"
    torch.save({"w": x, "cpu": x.cpu()}, path)
    loaded = torch.load(path, weights_only=False)
    same(loaded["w"], torch.ones(256, 256))


def test_errors_are_torch_errors(harp: Any) -> None:
    a = torch.ones(2, 3, device="harp")
    with pytest.raises(RuntimeError, match=r"same reduction dim|size"):
        a @ torch.ones(2, 3, device="harp")  # caught by shape inference, at this line
    index = torch.tensor([5]).to("harp")
    bad = torch.index_select(a, 1, index)  # out of range: only the agent can tell
    with pytest.raises(RuntimeError, match="index"):
        bad.cpu()
    assert a.sum().item() == 6.0  # the session goes on


def test_dropped_tensors_of_failed_or_unsent_operators_free_cleanly(harp: Any) -> None:
    """A tensor whose operator failed on the agent, or could not be sent at all, is dropped
    like any other: its free is taken (or never sent), not an error at a later sync point,
    and the agent holds no more tensors than before."""
    import gc

    gc.collect()
    before = torch.harp.agent_torch()["tensors"]
    a = torch.ones(2, 3, device="harp")
    bad = torch.index_select(a, 1, torch.tensor([5]).to("harp"))  # fails on the agent
    with pytest.raises(RuntimeError, match="index"):
        bad.cpu()
    with pytest.raises(RuntimeError, match=r"never made: the operator .*index_select.* failed"):
        bad.cpu()
    with pytest.raises(RuntimeError, match="move its tensors"):
        a.to("meta")  # refused before it is sent: its output was never made
    del a, bad
    gc.collect()
    torch.harp.synchronize()  # every free waiting goes out here
    assert torch.harp.agent_torch()["tensors"] == before


def test_inferred_layouts_are_kept_per_signature_and_stay_right(harp: Any) -> None:
    """An operator's output layouts are inferred once per signature: a loop runs meta inference
    once, and whatever changes an output (shapes, dtypes, a scalar's type, a value that sizes
    a factory's output) gets a plan of its own."""
    from harp_jupyter.torch import dispatch

    x, local = torch.ones(3, 4, device="harp"), torch.ones(3, 4)
    before = dispatch.inferences()
    for scale in (0.25, 2.0, -1.5, 3.0):  # one float type: the same plan, each value sent
        x = x * scale + 1.0
        local = local * scale + 1.0
    assert dispatch.inferences() == before + 2  # mul.Tensor and add.Tensor, once each
    same(x, local)
    for start, end, step in ((0, 2.5, 0.5), (0, 3.5, 0.5), (0, 4, 1), (0, 4.0, 1)):
        same(torch.arange(start, end, step, device="harp"), torch.arange(start, end, step))
    flags = torch.tensor([True, False]).to("harp")
    assert (flags + True).dtype == torch.bool and (flags + 1).dtype == torch.int64
    assert (torch.ones(2, 3, device="harp") + 1).shape == (2, 3)
    assert (torch.ones(5, device="harp") + 1).shape == (5,)
    same(torch.ones(2, 3, device="harp")[:, 1:].t() + 1, torch.ones(2, 3)[:, 1:].t() + 1)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False],
                                  [False, False, False]])
def test_synchronous_operators_leaving_outputs_undefined_keep_handles_in_step(
        harp: Any, mask: list[bool]) -> None:
    """An operator with no meta kernel runs synchronously, one output handle per tensor return;
    one its ``output_mask`` leaves undefined is None on both sides (the agent once counted only
    the defined ones: 'produced 1 tensors; the client expected 3'), and the handles of the
    others name the right tensors whatever their positions."""
    op = torch.ops.aten._slow_conv2d_backward.output_mask
    torch.manual_seed(5)
    grad, image, weight = torch.randn(1, 2, 3, 3), torch.randn(1, 1, 3, 3), torch.randn(2, 1, 1, 1)
    local = op(grad, image, weight, [1, 1], [1, 1], [0, 0], mask)
    remote = op(grad.to("harp"), image.to("harp"), weight.to("harp"), [1, 1], [1, 1], [0, 0],
                mask)
    assert [r is None for r in remote] == [not m for m in mask]
    for got, expected in zip(remote, local, strict=True):
        if expected is not None:
            same(got, expected)
    assert torch.harp.memory_allocated() >= 0  # the session goes on: no failed handle frees
    (image.to("harp") * 2).sum().item()


def test_assigning_data_and_module_dtype_casts_follow_the_new_tensor(harp: Any) -> None:
    """``p.data = q`` swaps the sizes under the wrapper; the wrapper must name ``q``'s tensor on
    the agent too (it kept its own: reads gave the old values, or failed past the old bytes,
    and ``model.double()`` on a harp model, which does it per parameter, broke)."""
    import gc

    gc.collect()
    before = torch.harp.memory_allocated()
    p = torch.zeros(4, device="harp")
    p.data = torch.ones(4, device="harp")
    assert p.cpu().tolist() == [1.0] * 4
    p.data = torch.arange(6.0, device="harp")
    assert p.shape == (6,) and p.cpu().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    p.data.mul_(2)  # .data aliases p, as torch's does
    assert p.sum().item() == 30.0
    torch.manual_seed(2)
    local = torch.nn.Linear(3, 2)
    remote = torch.nn.Linear(3, 2)
    remote.load_state_dict(local.state_dict())
    remote.to("harp").double()
    local.double()
    assert remote.weight.dtype == torch.float64
    same(remote.weight.detach(), local.weight.detach())
    x = torch.randn(5, 3, dtype=torch.float64)
    same(remote(x.to("harp")).detach(), local(x).detach())
    del p, remote
    gc.collect()
    assert torch.harp.memory_allocated() == before  # the replaced tensors' handles were freed
