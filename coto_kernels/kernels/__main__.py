"""``python -m coto_kernels.kernels``: which kernel backends are usable here, and why one is not."""

from __future__ import annotations

from . import backend_status, native_cuda_status


def main() -> int:
    for name, why in backend_status().items():
        print(f"{name:<7} {'available' if why is None else 'unavailable: ' + why}")
    why_cuda = native_cuda_status()
    print(f"{'native CUDA kernels':<7} {'available' if why_cuda is None else 'unavailable: ' + why_cuda}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
