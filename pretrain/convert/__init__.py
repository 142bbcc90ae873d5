"""Conversion: checkpoints to and from Hugging Face folders, and the weights a run starts from.

    hf_folder.py   the files of a folder: config.json, safetensors (sharded), pytorch_model.bin
    layouts.py     the two weight layouts (proseco-pretrain, proseco-hf) for any model family
    source.py      full weights from a folder, a consolidated file or a checkpoint (model.init_from)
    hf_export.py   `proseco convert export`      hf_import.py   `proseco convert import`
    cli.py         the `proseco convert` parsers

What is particular to a model family (its published names and config.json fields, its
vocabulary parameters, its remote-code modeling file) comes from `pretrain.models.ModelFamily`.
docs/conversion.md shows each direction with a command to copy.
"""
