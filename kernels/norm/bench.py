"""`kmodel bench norm`: RMSNorm alone, Triton vs torch.nn.RMSNorm (its F.rms_norm) vs the reference, forward and
forward+backward, GB/s of compulsory traffic and peak memory, in its own table `norm_<device>.md/.json`.

The measuring code is the ops benchmark's (`kmodel.kernels.loss.bench`, which times RMSNorm beside the fused
loss): this is that benchmark with `--op norm`, so both tables always measure the same way. Options as there.
"""

from __future__ import annotations

import argparse

from kmodel.kernels.benchmarking import device_slug, pick_device
from kmodel.kernels.loss import bench as ops_bench


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if "--name" not in argv:
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--device")
        device = pick_device(parser.parse_known_args(argv)[0].device)
        argv += ["--name", f"norm_{device_slug(device)}"]
    return ops_bench.main(["--op", "norm", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
