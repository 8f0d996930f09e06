"""Fine-tuning data-parallel over two CPU processes (torchrun, gloo): ranks stay identical."""

import dataclasses
import json
import subprocess
import sys

import pytest
from test_refactor import ROUTER, tiny  # noqa: F401  (the module fixture)

from edge_readme.loader import load_model


@pytest.mark.slow
@pytest.mark.parametrize("delta_rank", [0, 2])  # full weights; low-rank deltas
def test_two_process_finetune(tiny, tmp_path, delta_rank):  # noqa: F811
    args = {"delta_rank": delta_rank, "model_path": str(tiny / "dense"),
            "out": str(tmp_path / "moe"),
            "data": [str(tiny / "data.jsonl")], "seq_len": 32, "sequences_per_domain": 4,
            "router_steps": 4, "finetune_steps": 3, "progress": False,
            "cache_dir": str(tmp_path / "cache"), "checksum_dir": str(tmp_path)}
    args["router_config"] = dataclasses.asdict(ROUTER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "edge_readme.refactor.distributed", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    assert ranks[0]["report"]["finetune"]["experts"] is not None
    assert load_model(tmp_path / "moe").config.moe.num_experts == 3
    assert (tmp_path / "moe" / "deltas.safetensors").exists() == bool(delta_rank)
