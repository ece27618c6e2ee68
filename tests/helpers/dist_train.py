"""Run by tests/test_distributed.py under torchrun: train, then every rank writes its weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from semiseg.config import load_config
from semiseg.engine.trainer import Trainer

out = Path(sys.argv[1])
cfg = load_config(None, sys.argv[2:])
trainer = Trainer(cfg, out / "run", progress=False)
trainer.fit()
rank = trainer.dist.rank
save_file({k: v.contiguous() for k, v in trainer.method.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
