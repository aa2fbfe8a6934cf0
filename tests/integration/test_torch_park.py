"""harp tensors park and restore with their session, and a dead worker is a clear error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psutil
import pytest

torch = pytest.importorskip("torch")

from harp_jupyter import shim  # noqa: E402
from harp_jupyter.shim.session import get_session, reset_session  # noqa: E402
from tests.integration.test_torch_parity import small_cnn, train  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def harp(emulated_agent: Any) -> Iterator[Any]:
    import harp_jupyter.torch  # noqa: F401 - registers the harp device

    reset_session()
    shim.activate(agent=emulated_agent.endpoint)
    try:
        yield emulated_agent
    finally:
        reset_session()
        shim.deactivate()


def test_park_mid_training_then_the_losses_go_on_as_without(harp: Any) -> None:
    torch.manual_seed(5)
    local = small_cnn()
    remote = small_cnn()
    remote.load_state_dict(local.state_dict())
    remote.to("harp")
    view = next(remote.parameters())[0]  # a view must stay a view of its base
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    remote_opt = torch.optim.Adam(remote.parameters(), lr=1e-2)
    expected = train(local, local_opt, "cpu", 6)
    data = torch.Generator().manual_seed(7)
    got = train(remote, remote_opt, "harp", 3, data)
    session = get_session()
    parked = session.release()
    assert parked["bytes"] > 0 and session.parked
    got += train(remote, remote_opt, "harp", 3, data)
    assert session.restores == 1
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(view.detach().cpu(), next(local.parameters())[0].detach(),
                               rtol=1e-4, atol=1e-5)
    view.detach().zero_()
    assert next(remote.parameters()).detach()[0].abs().sum().item() == 0.0


def test_random_numbers_continue_across_a_park(harp: Any) -> None:
    torch.manual_seed(9)
    first = torch.randn(4, device="harp").cpu()
    get_session().release()
    second = torch.randn(4, device="harp").cpu()
    torch.manual_seed(9)
    torch.testing.assert_close(torch.cat([first, second]), torch.randn(8))


def test_a_killed_worker_is_a_clear_error_and_the_next_cell_starts_again(harp: Any) -> None:
    import harp_jupyter.torch as harp_torch

    x = torch.ones(64, 64, device="harp")
    assert x.sum().item() == 64 * 64
    port = int(get_session().welcome["worker"].rsplit(":", 1)[1])
    worker = next(child for child in psutil.Process(harp.process.pid).children()
                  for connection in child.net_connections(kind="tcp")
                  if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port)
    worker.kill()
    worker.wait(10)
    with pytest.raises(harp_torch.HarpTorchError) as failure:
        (x * 2).sum().item()
    assert "worker process died" in str(failure.value)
    with pytest.raises(harp_torch.SessionGoneError, match="re-run the code that creates it"):
        (x + 1).sum().item()
    y = torch.arange(10.0, device="harp")  # the next cell: a fresh session
    assert y.sum().item() == 45.0
