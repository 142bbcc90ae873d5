"""Training engines beside the native one (pretrain/train.py: FSDP2/DDP, tensor and pipeline
parallel). Each shares the model, objective, data, metrics, validation and checkpoint folder
with it and replaces only the model's wrapping, the optimizer step and the checkpoint's tensors.

    deepspeed.py   DeepSpeed ZeRO 1/2/3 (parallel.engine=deepspeed)
"""
