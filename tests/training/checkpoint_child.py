"""Child process for the crash tests: train a tiny model two steps, checkpointing after each.

Run as `python checkpoint_child.py ROOT`. With EMBER_CHECKPOINT_FAULT_AT set, the second save stops
at that point (announcing it on stdout) and waits to be killed.
"""
import os
import sys

import torch

from engine.config import ModelConfig
from engine.model import Transformer
from training.checkpointing import FAULT_ENV, save_checkpoint
from training.config import OptimSection, ScheduleSection
from training.optim import build_optimizer
from training.schedule import build_scheduler
from training.trainer import Trainer

CONFIG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def main(root: str) -> None:
    fault = os.environ.pop(FAULT_ENV, None)  # only the second save may stop
    model = Transformer(CONFIG)
    model.init_weights(0)
    optimizer = build_optimizer(model, OptimSection(lr=1e-3))
    scheduler = build_scheduler(optimizer, ScheduleSection(warmup_steps=1), 10)
    trainer = Trainer(model, optimizer, scheduler)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    for step in (1, 2):
        trainer.step([batch])
        if step == 2 and fault:
            os.environ[FAULT_ENV] = fault
        save_checkpoint(root, step, model=model, config=CONFIG, optimizer=optimizer, scheduler=scheduler,
                        state={"data_position": step * 2}, keep_last=1)
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
