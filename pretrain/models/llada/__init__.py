"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct): a LLaMA-style bidirectional transformer, the second
model family. See config.py (the `model:` section), model.py (the nn.Module), parallelize.py (its
plan) and checkpoint_names.py (the published Hugging Face layout)."""
