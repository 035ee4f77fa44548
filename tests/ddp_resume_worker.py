"""Run by torchrun from test_distributed_resume.py: load a run folder into a DDP model and
train one more epoch, as a resume does (``python tests/ddp_resume_worker.py DATA FROM OUT``)."""

import sys

import torch

from diygpt import distributed
from diygpt.checkpoints import config_from_run
from diygpt.data import prepare_loaders, read_text
from diygpt.model import GPTModel
from diygpt.tokenizer import get_tokenizer
from diygpt.training import TrainConfig, Trainer

data, resume_from, out = sys.argv[1:4]
env, device = distributed.init_distributed("cpu")
cfg = config_from_run(resume_from)
train_loader, val_loader = prepare_loaders(
    read_text(data), get_tokenizer(), batch_size=5, max_length=cfg.context_length, stride=192,
    shuffle=False,
)
model, parallel = distributed.wrap_model(GPTModel(cfg), env, device, fsdp="--fsdp" in sys.argv)
optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
distributed.load_training_state(resume_from, model, optimizer, parallel)
train_cfg = TrainConfig(num_epochs=1, eval_freq=100, eval_iter=1, out_dir=out, progress=False)
Trainer(model, optimizer, train_loader, val_loader, device, train_cfg, parallel=parallel).fit()
distributed.shutdown()
