"""The errors a user can act on. The CLI prints them as one line, without a traceback.

Each room raises a subclass naming what went wrong (the tokenizer's TokenizerError, the shard
format's ShardError, ...); these are the ones shared across rooms."""


class UserError(RuntimeError):
    """Bad input or configuration: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A configuration problem found before training starts; the message names field and fix."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not fit the model it is loaded into."""
