"""Run `refactor()` data-parallel under torchrun (gloo on CPU, nccl on CUDA).

    torchrun --nproc_per_node 2 -m edge_readme.refactor.distributed '{"model_path": ...}'

Every rank runs the same deterministic pipeline; fine-tuning splits each step's batch across
ranks and averages gradients; rank 0 writes the folder. With `checksum_dir` in the JSON, each
rank writes a checksum of its final router and expert weights (tests compare them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from edge_readme.config import RouterConfig

from . import pipeline


def _init() -> None:
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("EDGE_README_NCCL") else "gloo"
    dist.init_process_group(backend)


def main(argv: list[str] | None = None) -> None:
    args = json.loads((argv or sys.argv[1:])[0])
    checksum_dir = args.pop("checksum_dir", None)
    if isinstance(args.get("router_config"), dict):
        args["router_config"] = RouterConfig.from_dict(args["router_config"])
    _init()
    try:
        seen: dict = {}
        report = pipeline.refactor(**args, _on_done=seen.update)
        if checksum_dir:
            total = sum(float(t.double().sum()) for t in seen["tensors"])
            Path(checksum_dir, f"rank{dist.get_rank()}.json").write_text(
                json.dumps({"checksum": total, "report": report}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
