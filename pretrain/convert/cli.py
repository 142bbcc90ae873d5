"""`proseco convert export|import`: checkpoints to and from Hugging Face folders (docs/conversion.md).

Registered by pretrain/cli.py; torch and the conversion code are imported only when a command runs.
"""

from __future__ import annotations

import argparse

from pretrain.errors import UserError

LAYOUT_HELP = ("proseco-pretrain (default): this framework's names, padded vocabulary and run config, exact "
               "round trip; proseco-hf: the paper's layout (backbone.*, fused attn_qkv, ProsecoConfig), as "
               "kuleshov-group/proseco-owt")
EPILOG = """examples:
  proseco convert export runs/owt/checkpoints/step_00010000 hf/owt
  proseco convert export runs/owt hf/owt-paper --layout proseco-hf
  proseco convert import path/to/proseco-owt runs/proseco-owt --kind gpt2
  proseco train configs/owt-proseco.yaml model.init_from=runs/proseco-owt logging.run_dir=runs/finetune
"""


def _export(args: argparse.Namespace) -> None:
    from pretrain.convert.hf_export import export_checkpoint
    from pretrain.convert.hf_folder import parse_size

    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as err:
        raise UserError(f"--max-shard-size: {err}") from None
    try:
        done = export_checkpoint(args.checkpoint, args.out, layout=args.layout, use_ema=not args.raw,
                                 max_shard_bytes=max_shard_bytes, overwrite=args.overwrite)
    except OSError as err:  # a full disk, a folder that vanished: the file names itself in err
        raise UserError(f"exporting {args.checkpoint} to {args.out} failed: {err}") from None
    print(f"wrote {done.folder} ({args.layout} layout, {done.weights} weights): {', '.join(done.files)}")


def _import(args: argparse.Namespace) -> None:
    from pretrain.convert.hf_import import import_folder

    try:
        done = import_folder(args.folder, args.out, kind=args.kind, tokenizer=args.tokenizer,
                             vocab_multiple=args.vocab_multiple, overwrite=args.overwrite)
    except OSError as err:
        raise UserError(f"importing {args.folder} into {args.out} failed: {err}") from None
    print(f"wrote {done.checkpoint} (EMA and raw weights; vocabulary {done.run.model.vocab_size} padded to a "
          f"multiple of {done.run.model.vocab_multiple}); sample with `proseco sample --checkpoint {done.run_dir}`, "
          f"fine-tune with model.init_from={done.run_dir}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="checkpoints to and from Hugging Face folders",
                             description="Export checkpoints to Hugging Face folders (loadable with transformers "
                                         "and trust_remote_code) and import the released ProSeCo/MDLM models.",
                             epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert_sub = convert.add_subparsers(dest="convert_command", required=True)

    export = convert_sub.add_parser("export", help="a checkpoint (any dp/tp/pp layout) -> a Hugging Face folder")
    export.add_argument("checkpoint", help="checkpoint folder, or a run folder (latest checkpoint)")
    export.add_argument("out", help="output folder (config.json, model.safetensors, modeling_proseco.py, tokenizer/)")
    export.add_argument("--layout", default="proseco-pretrain", choices=["proseco-pretrain", "proseco-hf"],
                        help=LAYOUT_HELP)
    export.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    export.add_argument("--max-shard-size", default="5GB",
                        help="split the weights into shards with an index above this size (default 5GB)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    export.set_defaults(func=_export)

    imp = convert_sub.add_parser("import", help="a Hugging Face folder (the paper's layout or an export) -> a "
                                                "checkpoint that loads at any dp/tp/pp layout")
    imp.add_argument("folder", help="model folder: config.json + model.safetensors (or shards, or pytorch_model.bin)")
    imp.add_argument("out", help="run folder to create: OUT/checkpoints/step_00000000 and OUT/config.yaml")
    imp.add_argument("--kind", choices=["gpt2"], help="pair with the GPT-2 tokenizer (the released OWT models)")
    imp.add_argument("--tokenizer", help="pair with this tokenizer folder instead (default: the folder's tokenizer/)")
    imp.add_argument("--vocab-multiple", type=int,
                     help="pad the vocabulary to a multiple of this (default: model.vocab_multiple, 64)")
    imp.add_argument("--overwrite", action="store_true", help="replace an earlier import at OUT")
    imp.set_defaults(func=_import)
