"""`proseco train|sample|eval|checkpoint ...`: the commands that run models."""

from __future__ import annotations

import argparse
import json
import logging

from pretrain.config import load_config


def _train(args: argparse.Namespace) -> None:
    from pretrain.train import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = train(load_config(args.config, args.overrides))
    if result and args.print_result:
        print(json.dumps(result))


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pretrain a model (one process, torchrun, srun or deepspeed)")
    train.add_argument("config", help="YAML run config, e.g. configs/shakespeare.yaml")
    train.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=100")
    train.add_argument("--print-result", action="store_true", help="print the final validation metrics as JSON")
    train.set_defaults(func=_train)
