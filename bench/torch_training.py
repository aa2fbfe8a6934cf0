"""harp tensors against local torch on the same device: training steps and tiny-op throughput.

    python bench/torch_training.py [--emulated] [--steps N] [--out bench/results/torch-<gpu>.md]

One run against a local ``harp-agent`` (pycuda executor: CUDA torch in its worker; ``--emulated``:
CPU torch, against local CPU torch). Rows: a small CNN training step at batch 64 and a
transformer block training step (both short on a GPU: bound by the per-operator cost), the same
at sizes where the GPU's work dominates (``--large``, the default on a GPU: what the 1.3x target
is about), and a loop of tiny elementwise ops (the per-operator cost: the dispatch, the wire,
the agent's dispatch). Each step ends in ``loss.item()``, as a training loop that logs its loss
does. Printed as a Markdown table against ARCHITECTURE.md section 7's target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from forwarding import row, start_agent  # noqa: E402


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10))


def transformer_block() -> torch.nn.Module:
    return torch.nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048,
                                            batch_first=True)


def step_time(model: torch.nn.Module, make_batch: Callable[[], tuple[Any, Any]], device: str,
              steps: int, loss_of: Callable[[Any, Any], Any]) -> float:
    """Median seconds of one optimizer step ending in loss.item()."""
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = make_batch()
    x, y = x.to(device), y.to(device)
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_of(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
        if i >= 2:  # warm-up: the agent imports torch, caches allocate, kernels load
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def tiny_ops(device: str, count: int) -> float:
    """Seconds per tiny op (add on 16 floats) in a loop of ``count``, synced at the end."""
    x = torch.ones(16, device=device)
    x.sum().item()
    started = time.perf_counter()
    for _ in range(count):
        x = x + 1.0
    x.sum().item()
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=None,
                        help="also the compute-bound sizes (default: on a GPU only)")
    args = parser.parse_args()
    large = (not args.emulated) if args.large is None else args.large
    local_device = "cpu" if args.emulated else "cuda"
    cross_entropy = torch.nn.functional.cross_entropy
    mse = torch.nn.functional.mse_loss
    cnn_batch = lambda: (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))  # noqa: E731
    block_batch = lambda: (torch.randn(16, 128, 512), torch.randn(16, 128, 512))  # noqa: E731
    cases = [("small CNN training step, batch 64 (ms)", small_cnn, cnn_batch, cross_entropy),
             ("transformer block training step, 16x128x512 (ms)", transformer_block,
              block_batch, mse)]
    if large:
        cases += [
            ("small CNN training step, batch 4096 (ms)", small_cnn,
             lambda: (torch.randn(4096, 3, 32, 32), torch.randint(0, 10, (4096,))),
             cross_entropy),
            ("transformer block training step, 64x512x512 (ms)", transformer_block,
             lambda: (torch.randn(64, 512, 512), torch.randn(64, 512, 512)), mse)]
    # local torch first: once harp is registered torch makes it the process's accelerator,
    # and autograd on cuda tensors in this process stops at an assert (device.py)
    local_steps = []
    for _what, make, batch, loss in cases:
        torch.manual_seed(0)
        local_steps.append(step_time(make(), batch, local_device, args.steps, loss))
    local_tiny = tiny_ops(local_device, args.tiny)
    proc, endpoint = start_agent(args.emulated)
    try:
        from harp_jupyter import shim

        shim.activate(agent=endpoint)
        import harp_jupyter.torch  # noqa: F401 - registers the harp device

        rows = []
        for (what, make, batch, loss), local in zip(cases, local_steps, strict=True):
            torch.manual_seed(0)
            remote = step_time(make(), batch, "harp", args.steps, loss)
            ratio = remote / local
            bound = "compute-bound" if local > 0.01 else "operator-bound"
            rows.append(row(what, f"{local * 1e3:.2f}", f"{remote * 1e3:.2f}", ratio,
                            f"≤ 1.3x local ({bound})", ratio <= 1.3))
        remote = tiny_ops("harp", args.tiny)
        rows.append(row("tiny op (x + 1 on 16 floats), per op (µs)", f"{local_tiny * 1e6:.1f}",
                        f"{remote * 1e6:.1f}", remote / local_tiny, "reported", None))
        device = torch.harp.get_device_name()
        lines = [f"# harp tensors vs local torch ({device}, local {local_device}, torch "
                 f"{torch.__version__})", "",
                 "| measure | local torch | harp | ratio | target | |", "|---|---|---|---|---|---|",
                 *rows]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
    finally:
        from harp_jupyter.shim.session import reset_session

        reset_session()
        proc.kill()


if __name__ == "__main__":
    main()
