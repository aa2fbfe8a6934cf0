"""PyTorch on an Elastic GPU: tensors on the ``harp`` device live in the leased GPU session.

Importing this package registers the device (``device.register``)::

    import torch, harp_jupyter.torch
    model = Net().to("harp")
    x = torch.randn(64, 3, 32, 32, device="harp")
    loss = model(x).sum(); loss.backward(); opt.step()
    print(loss.item())           # a sync point, as .cpu() and .tolist() are

Operators run on the agent through the same session, lease and batches as pycuda code
(docs/torch-design.md); autograd, modules and optimizers run here unchanged.
"""

from __future__ import annotations

from harp_jupyter.torch.client import HarpTorchError, SessionGoneError
from harp_jupyter.torch.device import HarpDeviceModule, register
from harp_jupyter.torch.tensor import DEVICE_TYPE, HarpTensor

register()

__all__ = ["DEVICE_TYPE", "HarpDeviceModule", "HarpTensor", "HarpTorchError",
           "SessionGoneError", "register"]
