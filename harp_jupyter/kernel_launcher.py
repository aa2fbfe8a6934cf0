"""Start an IPython kernel with the forwarding shim active.

The Elastic GPU kernelspec runs ``python -m harp_jupyter.kernel_launcher -f {connection_file}``:
pycuda imports in that kernel resolve to the shim, so notebooks run unmodified pycuda code on a GPU
agent. The agent comes from ``HARP_AGENT``; nothing connects until the first GPU call.
"""

from __future__ import annotations


def main() -> None:
    from harp_jupyter.shim import activate

    activate()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
