"""The on-disk shard format: webdataset tar shards of fixed-length token sequences + manifest.json.

Layout of a shard folder (a local path or any URL `tokenizer.storage` reads)::

    manifest.json              what is here (see `Manifest`)
    tokenizer/                 a copy of the tokenizer the tokens were made with
    train/shard-000000.tar     webdataset tars of "<key>.tokens.npy" members
    val/shard-000000.tar

Two versions, both ordinary webdataset tars (mtime 0, fixed-length names, as webdataset's TarWriter
writes them):

- proseco-shards-v2 (compact, written by default): each member holds a block of `block_samples`
  samples, ``tokens.npy`` of shape [K, seq_len], K chosen so that a member is about 1 MiB; its key
  is the split-wide index of the block's first sample. The tar header, the npy header and the
  padding of one member cost ~1 KB per MiB, and the archive ends after its end-of-archive marker
  (no padding to tar's 10 KB record, which readers do not need), so a folder is < 1 % larger than
  its raw tokens at every seq_len. `webdataset.WebDataset(url).decode()` yields one record per block,
  {"__key__", "tokens.npy": array [K, seq_len]} (the last block of a shard may be shorter).
- proseco-shards-v1: one sample per member, ``tokens.npy`` of shape [seq_len]: 512 bytes of tar
  header and an npy header per sample (8 bytes per token at seq_len 128 with uint16). Still read;
  `proseco tokenizer migrate` converts a folder to v2 with the same tokens.

Every member but a shard's last has the same size (the stride), so sample i of a shard lies at a
byte offset computed from i alone: the loader reads any contiguous run of samples with one range
request, and checks on the way every tar header (and npy header) the range covers.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pretrain.errors import UserError
from pretrain.files import atomic_write_bytes
from tokenizer.corpora import CONTENTS, described_content
from tokenizer.storage import DEFAULT_POLICY, ReadPolicy, Store

FORMAT_V1 = "proseco-shards-v1"
FORMAT_V2 = "proseco-shards-v2"
FORMAT = FORMAT_V2
"""What `proseco tokenizer shard` writes."""
FORMATS = (FORMAT_V1, FORMAT_V2)
MANIFEST = "manifest.json"
TAR_BLOCK = 512
KEY_DIGITS = 12
MEMBER_SUFFIX = ".tokens.npy"
MEMBER_TARGET_BYTES = 1 << 20
"""A v2 member holds as many samples as fit in about this many bytes of tokens."""
HEADER_GAP_BYTES = 64 << 10
"""A read starting inside a block also fetches the block's header: in the same request when the
bytes between them are fewer than this, else as a second small range."""
END_OF_ARCHIVE = 2 * TAR_BLOCK


class ShardError(UserError):
    """A shard folder that cannot be used as it is; the message says what to do."""


@dataclass
class ShardInfo:
    path: str
    """Path relative to the shard folder."""
    samples: int
    first_key: int
    """Key (global index within the split) of the shard's first sample."""
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    seq_len: int
    dtype: str
    """numpy dtype of the stored tokens: uint16 when the vocabulary fits, else uint32."""
    packing: str
    """pack: documents joined by EOS and cut into BOS + chunk + EOS; pad: one document per sample."""
    corpus: str
    tokenizer_sha256: str
    vocab_size: int
    splits: dict[str, SplitInfo]
    stats: dict[str, int] = field(default_factory=dict)
    format: str = FORMAT_V1
    """The default describes a v1 folder (which records no block size); the writer names its format."""
    fingerprint: str = ""
    content: str = "text"
    """What the documents are, one of tokenizer.corpora.CONTENTS ("text" or "smiles"); it picks the
    judge of samples. Not in the fingerprint: it does not change the tokens."""
    block_samples: int = 1
    """Samples per tar member: 1 in v1, K (about 1 MiB of tokens) in v2."""

    def __post_init__(self) -> None:
        if self.content not in CONTENTS:
            raise ValueError(f"content {self.content!r} is not one of {', '.join(CONTENTS)}")

    def compute_fingerprint(self) -> str:
        """Hash of everything that determines the token stream (not timestamps or stats)."""
        content = {"format": self.format, "seq_len": self.seq_len, "dtype": self.dtype,
                   "tokenizer": self.tokenizer_sha256,
                   "splits": {name: [(s.path, s.samples, s.sha256) for s in split.shards]
                              for name, split in sorted(self.splits.items())}}
        if self.format != FORMAT_V1:  # v1 fingerprints stay what they were (saved data positions hold them)
            content["block_samples"] = self.block_samples
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        # Written before manifests recorded the content: the one its built-in corpus declares.
        raw.setdefault("content", described_content(raw["corpus"]))
        splits = {name: SplitInfo(samples=s["samples"], shards=[ShardInfo(**x) for x in s["shards"]])
                  for name, s in raw.pop("splits").items()}
        return cls(splits=splits, **raw)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def default_block_samples(seq_len: int, dtype: str) -> int:
    """K for v2: samples in about MEMBER_TARGET_BYTES of tokens (at least one)."""
    return max(1, MEMBER_TARGET_BYTES // (seq_len * np.dtype(dtype).itemsize))


# ---------------------------------------------------------------------------------------------
# Geometry: where each sample's bytes are


@dataclass(frozen=True)
class Geometry:
    """Byte layout shared by every shard of a folder."""

    seq_len: int
    dtype: str
    block_samples: int
    """Samples per member (K)."""
    blocked: bool
    """v2: members hold arrays [rows, seq_len] and the archive is not padded to tar's record size;
    v1: members hold one array [seq_len], padded as TarWriter pads."""

    @classmethod
    def of(cls, manifest: Manifest) -> Geometry:
        blocked = manifest.format != FORMAT_V1
        return cls(manifest.seq_len, manifest.dtype, manifest.block_samples if blocked else 1, blocked)

    @property
    def row_bytes(self) -> int:
        return self.seq_len * np.dtype(self.dtype).itemsize

    def shape(self, rows: int) -> tuple[int, ...]:
        return (rows, self.seq_len) if self.blocked else (self.seq_len,)

    def npy_header(self, rows: int) -> bytes:
        return _npy_header(self.shape(rows), np.dtype(self.dtype).str)

    def data_size(self, rows: int) -> int:
        """Bytes of a member's data (npy header + tokens) before padding."""
        return len(self.npy_header(rows)) + rows * self.row_bytes

    def member_bytes(self, rows: int) -> int:
        """Bytes of one member of `rows` samples: header, data, padding to 512."""
        return TAR_BLOCK + -(-self.data_size(rows) // TAR_BLOCK) * TAR_BLOCK

    @property
    def stride(self) -> int:
        """Bytes of every member but possibly a shard's last (which may hold fewer samples)."""
        return self.member_bytes(self.block_samples)

    def block_rows(self, block: int, samples: int) -> int:
        return min(self.block_samples, samples - block * self.block_samples)

    def shard_bytes(self, samples: int) -> int:
        """The size of a shard of `samples` samples."""
        full, rest = divmod(samples, self.block_samples)
        body = full * self.stride + (self.member_bytes(rest) if rest else 0) + END_OF_ARCHIVE
        return body if self.blocked else body + -body % tarfile.RECORDSIZE


@functools.lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npy_header_size(seq_len: int, dtype: str) -> int:
    """Bytes of the .npy header in front of the raw tokens of one v1 member."""
    return len(_npy_header((seq_len,), np.dtype(dtype).str))


def member_stride(seq_len: int, dtype: str) -> int:
    """Bytes one sample occupies in a v1 shard: a tar header plus its data padded to 512 bytes."""
    return Geometry(seq_len, dtype, 1, blocked=False).stride


def member_name(key: int) -> str:
    return f"{key:0{KEY_DIGITS}d}{MEMBER_SUFFIX}"


@functools.lru_cache(maxsize=16)
def _header_template(data_size: int) -> np.ndarray:
    """The 512-byte tar header of a member of `data_size` bytes with key 0, as webdataset's
    TarWriter writes it (mtime 0); other keys differ in the name digits and the checksum."""
    info = tarfile.TarInfo(member_name(0))
    info.size, info.mtime, info.mode, info.uname, info.gname = data_size, 0, 0o444, "bigdata", "bigdata"
    header = np.frombuffer(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"), dtype=np.uint8)
    assert len(header) == TAR_BLOCK, "a member name this short never needs an extended header"
    header.flags.writeable = False
    return header


def member_headers(keys: np.ndarray, data_size: int) -> np.ndarray:
    """Tar headers [n, 512] of members with these keys, built with array operations: one template
    from the standard library, its key digits and checksum patched per row."""
    template = _header_template(data_size)
    keys = np.asarray(keys, dtype=np.int64)
    rows = np.repeat(template[None, :], len(keys), axis=0)
    digits = (keys[:, None] // 10 ** np.arange(KEY_DIGITS - 1, -1, -1)) % 10 + ord("0")
    rows[:, :KEY_DIGITS] = digits
    # Checksum: the byte sum of the header with its own 8-byte field counted as spaces, written as
    # six octal digits, NUL, space (the stdlib's layout).
    fixed = int(template.astype(np.int64).sum()) - int(template[148:156].astype(np.int64).sum()) + 8 * ord(" ")
    checksum = fixed - int(template[:KEY_DIGITS].astype(np.int64).sum()) + digits.sum(axis=1)
    rows[:, 148:154] = (checksum[:, None] // 8 ** np.arange(5, -1, -1)) % 8 + ord("0")
    rows[:, 154], rows[:, 155] = 0, ord(" ")
    return rows


# ---------------------------------------------------------------------------------------------
# Writing


def shard_bytes(samples: np.ndarray, first_key: int, geometry: Geometry | None = None) -> bytes:
    """A whole shard as bytes. In v1 (the default geometry) exactly the tar webdataset.TarWriter(mtime=0)
    writes (tests/test_shards.py checks it byte for byte); in v2 its members hold blocks of
    `geometry.block_samples` rows. Built with array operations, not one Python call per member."""
    samples = np.ascontiguousarray(samples)
    n, seq_len = samples.shape
    geometry = geometry or Geometry(seq_len, samples.dtype.name, 1, blocked=False)
    k = geometry.block_samples
    parts = []
    full = n // k
    if full:
        parts.append(_members(samples[: full * k].reshape(full, k * seq_len), first_key, k, geometry))
    if n % k:
        parts.append(_members(samples[full * k:].reshape(1, -1), first_key + full * k, n % k, geometry))
    body = b"".join(parts) + bytes(END_OF_ARCHIVE)
    return body if geometry.blocked else body + bytes(-len(body) % tarfile.RECORDSIZE)


def _members(blocks: np.ndarray, first_key: int, rows: int, geometry: Geometry) -> bytes:
    """Members of `rows` samples each, one per row of `blocks` [count, rows * seq_len]."""
    count = len(blocks)
    npy_header = np.frombuffer(geometry.npy_header(rows), dtype=np.uint8)
    out = np.zeros((count, geometry.member_bytes(rows)), dtype=np.uint8)
    out[:, :TAR_BLOCK] = member_headers(first_key + rows * np.arange(count), geometry.data_size(rows))
    data_start = TAR_BLOCK + len(npy_header)
    out[:, TAR_BLOCK:data_start] = npy_header
    out[:, data_start: data_start + rows * geometry.row_bytes] = blocks.view(np.uint8).reshape(count, -1)
    return out.tobytes()


def write_shard(path: Path, samples: np.ndarray, first_key: int, geometry: Geometry | None = None) -> ShardInfo:
    """Write samples [n, seq_len] as a webdataset tar; written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = shard_bytes(np.asarray(samples), first_key, geometry)
    atomic_write_bytes(path, body)
    return ShardInfo(path=str(path), samples=len(samples), first_key=first_key, bytes=len(body),
                     sha256=hashlib.sha256(body).hexdigest())


def write_manifest(folder: str | Path | Store, manifest: Manifest) -> None:
    """Fill in the fingerprint and write manifest.json (atomically locally)."""
    store = folder if isinstance(folder, Store) else Store(folder)
    manifest.fingerprint = manifest.compute_fingerprint()
    store.write_bytes(MANIFEST, manifest.to_json().encode())


def read_manifest(folder: str | Path | Store, policy: ReadPolicy = DEFAULT_POLICY) -> Manifest:
    store = folder if isinstance(folder, Store) else Store(folder, policy)
    url = store.url(MANIFEST)
    try:
        text = store.read_bytes(MANIFEST).decode()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ShardError(f"{url} not found: {store.root} is not a shard folder; build one with "
                         "`proseco tokenizer shard --corpus NAME --tokenizer DIR --seq-len L --out DIR`") from None
    try:
        manifest = Manifest.from_json(text)
    except (ValueError, TypeError, KeyError) as err:
        raise ShardError(f"{url} is not a readable manifest ({err}); rebuild the shards") from None
    if manifest.format not in FORMATS:
        raise ShardError(f"{url} has format {manifest.format!r}, this version reads {' and '.join(FORMATS)}; "
                         "rebuild the shards")
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Block:
    """The part of one member a read covers."""

    index: int
    rows: int
    """Samples the member holds."""
    first: int
    stop: int
    """Samples [first, stop) of the shard that the read takes from it."""


class ShardReader:
    """Random access to the samples of one shard, checking every tar and npy header it reads.

    A read is split into the byte ranges to fetch (`ranges`) and their parsing (`parse`), so that
    a caller can fetch ahead in other threads; `read` does both."""

    def __init__(self, store: Store, info: ShardInfo, geometry: Geometry):
        self.store, self.info, self.geometry = store, info, geometry
        self.verified: set[int] = set()
        """Blocks whose headers this reader has checked and found intact: a later read starting
        inside one of them does not fetch its header again (one request per read, not two)."""

    @property
    def url(self) -> str:
        return self.store.url(self.info.path)

    @property
    def blocks(self) -> int:
        """Members in the shard."""
        return -(-self.info.samples // self.geometry.block_samples)

    def _blocks(self, start: int, stop: int) -> list[_Block]:
        k = self.geometry.block_samples
        return [_Block(b, self.geometry.block_rows(b, self.info.samples), max(start, b * k), min(stop, (b + 1) * k))
                for b in range(start // k, (stop - 1) // k + 1)]

    def _data_offset(self, block: _Block) -> int:
        """Byte offset of the first token of a block."""
        return block.index * self.geometry.stride + TAR_BLOCK + len(self.geometry.npy_header(block.rows))

    def _sample_offset(self, block: _Block, sample: int) -> int:
        return self._data_offset(block) + (sample - block.index * self.geometry.block_samples) * self.geometry.row_bytes

    def ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Byte ranges [lo, hi) holding samples [start, stop) and the headers of their members not
        yet verified."""
        blocks = self._blocks(start, stop)
        first, last = blocks[0], blocks[-1]
        header = first.index * self.geometry.stride
        lo, hi = self._sample_offset(first, start), self._sample_offset(last, stop)
        if lo - header <= HEADER_GAP_BYTES:
            return [(header, hi)]
        if first.index in self.verified:
            return [(lo, hi)]
        return [(header, header + TAR_BLOCK + len(self.geometry.npy_header(first.rows))), (lo, hi)]

    def fetch(self, start: int, stop: int) -> list[tuple[tuple[int, int], bytes]]:
        """The (range, bytes) pairs `parse` takes (thread-safe: only reads)."""
        ranges = self.ranges(start, stop)
        return list(zip(ranges, self.store.read_ranges(self.info.path, ranges)))

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples [start, stop) as int64 [n, seq_len] and a bool [n]: False where a sample is unreadable."""
        return self.parse(start, stop, self.fetch(start, stop))

    def parse(self, start: int, stop: int, spans: list[tuple[tuple[int, int], bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """`read`'s result from what `fetch(start, stop)` returned (shorter where the file ends early)."""

        def get(lo: int, hi: int) -> bytes:
            """Bytes [lo, hi) as fetched: fewer where the file ended, none where nothing was fetched."""
            for (begin, end), chunk in spans:
                if begin <= lo and hi <= end:
                    return chunk[lo - begin: hi - begin]
            return b""

        geometry, n = self.geometry, stop - start
        dtype = np.dtype(geometry.dtype).newbyteorder("<")
        tokens = np.zeros((n, geometry.seq_len), dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        for block in self._blocks(start, stop):
            base = block.index * geometry.stride
            npy = geometry.npy_header(block.rows)
            key = self.info.first_key + block.index * geometry.block_samples
            expected = member_headers(np.array([key]), geometry.data_size(block.rows))[0].tobytes()
            fetched = get(base, base + TAR_BLOCK + len(npy))
            if fetched:
                header_ok = fetched == expected + npy
                if header_ok:
                    self.verified.add(block.index)
            else:  # not fetched: `ranges` left it out because it was verified before
                header_ok = block.index in self.verified
            data = get(self._sample_offset(block, block.first), self._sample_offset(block, block.stop))
            present = len(data) // geometry.row_bytes  # a truncated file ends mid-block
            rows = slice(block.first - start, block.first - start + present)
            raw = np.frombuffer(data[: present * geometry.row_bytes], dtype=dtype)
            tokens[rows] = raw.reshape(present, geometry.seq_len)
            ok[rows] = header_ok
        return tokens, ok
