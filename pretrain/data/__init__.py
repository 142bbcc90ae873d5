"""Streaming token batches from a shard folder, by global sample position, exactly resumable.

The folder is a local path or a URL (s3://, gs://, az://, https://, hf://): every read is a byte
range of one shard, and each reading process fetches the bytes of its next `prefetch` items ahead
in threads (the schedule below says exactly which), so remote latency hides behind the training
step; a failed request is retried and never changes which sample a position holds.

The training stream is an infinite sequence of global positions P = 0, 1, 2, ... With N samples
in the split, P is sample i = P % N of epoch e = P // N. Each epoch has its own seeded order: a
permutation of the shards and, inside each shard, a rotation of its samples (the shards were
shuffled when they were written, so a contiguous run of samples is already a random one). Epoch
index i maps to a (shard, sample) pair through the cumulative sample counts in that order.

Optimizer step s consumes the global batch of positions [s*B, (s+1)*B), split rank-major: data
parallel rank r gets [s*B + r*A*mb, s*B + (r+1)*A*mb) as A micro-batches of mb consecutive
positions (A = B // (dp * mb)). Hence:

* the union of all ranks' micro-batches of a step is the same set of samples for any dp, micro
  batch size and number of DataLoader workers, so a run resumes exactly on another layout;
* each rank reads its own contiguous ranges and nothing else: there is no shard-to-rank
  assignment, so no rank is ever starved whatever the number of shards, ranks and workers;
* the whole loader state is one integer (the position of the next global batch), and resuming
  is O(1): the order of any epoch is recomputed from (seed, epoch), never replayed.

Orders depend only on (seed, epoch), never on ranks or workers. DataLoader worker w of W
produces this rank's micro-batches k = w, w + W, ...; the DataLoader takes items from its
workers round-robin, so the items arrive in exactly the order of k.

Unreadable data never hangs and never shifts which position holds which sample: a missing or
wrong-size shard (checked at construction) and a sample whose tar header fails its checks (at
read time) are delivered in place, zeroed, with ``valid=False``, and counted; past
``max_corrupt_fraction`` a `ShardError` names the shard and the fix.
"""

from typing import Any

from pretrain.data.loader import EvalLoader, TrainLoader, eval_batches
from pretrain.data.order import EpochOrder
from pretrain.data.shards import SplitShards, open_shards, open_split
from tokenizer.storage import ReadPolicy


def read_options(data: Any) -> dict[str, Any]:
    """The loaders' keyword arguments for reading, from a run's data config (data.prefetch and
    data.read_*): `TrainLoader(folder, ..., **read_options(cfg.data))`."""
    return {"prefetch": data.prefetch,
            "read_policy": ReadPolicy(timeout_s=data.read_timeout_s, retries=data.read_retries,
                                      backoff_s=data.read_backoff_s)}


__all__ = ["EpochOrder", "EvalLoader", "SplitShards", "TrainLoader", "eval_batches", "open_shards", "open_split",
           "read_options"]
