"""The DiT of MDLM and ProSeCo (config.py, model.py, parallelize.py, checkpoint_names.py, family.py)."""
