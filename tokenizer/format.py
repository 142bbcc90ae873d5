"""The on-disk shard format: webdataset tar shards of fixed-length token sequences + manifest.json.

Layout of a shard folder::

    manifest.json              what is here (see `Manifest`)
    tokenizer/                 a copy of the tokenizer the tokens were made with
    train/shard-000000.tar     webdataset tars, one member per sample: "<key>.tokens.npy"
    val/shard-000000.tar

Every member holds one `.npy` array of `seq_len` tokens, with a fixed name length and mtime 0,
exactly as webdataset's TarWriter writes it. Members therefore all have the same size, so sample i of a shard
starts at byte i * stride: the loader reads any contiguous range of samples with one seek and
one read, and can check each 512-byte tar header on the way. The files are ordinary webdataset
shards: `webdataset.WebDataset(path).decode()` yields {"__key__", "tokens.npy": array}.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pretrain.errors import UserError
from pretrain.files import atomic_write_bytes, atomic_write_text
from tokenizer.corpora import CONTENTS, described_content

FORMAT = "proseco-shards-v1"
MANIFEST = "manifest.json"
TAR_BLOCK = 512
KEY_DIGITS = 12
MEMBER_SUFFIX = ".tokens.npy"


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
    format: str = FORMAT
    fingerprint: str = ""
    content: str = "text"
    """What the documents are, one of tokenizer.corpora.CONTENTS ("text" or "smiles"); it picks the
    judge of samples. Not in the fingerprint: it does not change the tokens."""

    def __post_init__(self) -> None:
        if self.content not in CONTENTS:
            raise ValueError(f"content {self.content!r} is not one of {', '.join(CONTENTS)}")

    def compute_fingerprint(self) -> str:
        """Hash of everything that determines the token stream (not timestamps or stats)."""
        content = {"format": self.format, "seq_len": self.seq_len, "dtype": self.dtype,
                   "tokenizer": self.tokenizer_sha256,
                   "splits": {name: [(s.path, s.samples, s.sha256) for s in split.shards]
                              for name, split in sorted(self.splits.items())}}
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


def _npy_bytes(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    return buffer.getvalue()


def npy_header_size(seq_len: int, dtype: str) -> int:
    """Bytes of the .npy header in front of the raw tokens of one member."""
    return len(_npy_bytes(np.zeros(seq_len, dtype=dtype))) - seq_len * np.dtype(dtype).itemsize


def member_stride(seq_len: int, dtype: str) -> int:
    """Bytes one sample occupies in a shard: a tar header plus its data padded to 512 bytes."""
    data = npy_header_size(seq_len, dtype) + seq_len * np.dtype(dtype).itemsize
    return TAR_BLOCK + -(-data // TAR_BLOCK) * TAR_BLOCK


def member_name(key: int) -> str:
    return f"{key:0{KEY_DIGITS}d}{MEMBER_SUFFIX}"


def _member_header(key: int, data_size: int) -> np.ndarray:
    """The 512-byte tar header of one member, as webdataset's TarWriter writes it (mtime 0)."""
    info = tarfile.TarInfo(member_name(key))
    info.size, info.mtime, info.mode, info.uname, info.gname = data_size, 0, 0o444, "bigdata", "bigdata"
    header = np.frombuffer(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"), dtype=np.uint8)
    assert len(header) == TAR_BLOCK, "a member name this short never needs an extended header"
    return header


def shard_bytes(samples: np.ndarray, first_key: int) -> bytes:
    """A whole shard as bytes: the tar that webdataset.TarWriter(mtime=0) writes for these samples
    (tests/test_shards.py checks it byte for byte), built with array operations instead of one
    Python call per member: about 100x faster, which keeps sharding MOSES under a minute.

    Members differ only in the key digits of their name and in the header checksum, so one
    header from the standard library is repeated and those bytes are patched per row.
    """
    n, seq_len = samples.shape
    npy = _npy_bytes(samples[0])
    npy_header = np.frombuffer(npy[: len(npy) - samples[0].nbytes], dtype=np.uint8)
    template = _member_header(first_key, len(npy))
    rows = np.zeros((n, member_stride(seq_len, samples.dtype.str)), dtype=np.uint8)
    rows[:, :TAR_BLOCK] = template
    keys = first_key + np.arange(n, dtype=np.int64)
    digits = (keys[:, None] // 10 ** np.arange(KEY_DIGITS - 1, -1, -1)) % 10 + ord("0")
    rows[:, :KEY_DIGITS] = digits
    # Checksum: the byte sum of the header with its own 8-byte field counted as spaces, written as
    # six octal digits, NUL, space (the stdlib's layout).
    fixed = int(template.astype(np.int64).sum()) - int(template[148:156].astype(np.int64).sum()) + 8 * ord(" ")
    checksum = fixed - int(template[:KEY_DIGITS].astype(np.int64).sum()) + digits.sum(axis=1)
    rows[:, 148:154] = (checksum[:, None] // 8 ** np.arange(5, -1, -1)) % 8 + ord("0")
    rows[:, 154], rows[:, 155] = 0, ord(" ")
    data_start = TAR_BLOCK + len(npy_header)
    rows[:, TAR_BLOCK:data_start] = npy_header
    rows[:, data_start: data_start + samples[0].nbytes] = np.ascontiguousarray(samples).view(np.uint8).reshape(n, -1)
    body = rows.tobytes() + bytes(2 * TAR_BLOCK)  # end-of-archive marker
    return body + bytes(-len(body) % tarfile.RECORDSIZE)


def write_shard(path: Path, samples: np.ndarray, first_key: int) -> ShardInfo:
    """Write samples [n, seq_len] as a webdataset tar; written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = shard_bytes(np.asarray(samples), first_key)
    atomic_write_bytes(path, body)
    return ShardInfo(path=str(path), samples=len(samples), first_key=first_key, bytes=len(body),
                     sha256=hashlib.sha256(body).hexdigest())


def write_manifest(folder: Path, manifest: Manifest) -> None:
    manifest.fingerprint = manifest.compute_fingerprint()
    atomic_write_text(folder / MANIFEST, manifest.to_json())


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {folder} is not a shard folder; build one with "
                         "`proseco tokenizer shard --corpus NAME --tokenizer DIR --seq-len L --out DIR`")
    try:
        manifest = Manifest.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as err:
        raise ShardError(f"{path} is not a readable manifest ({err}); rebuild the shards") from None
    if manifest.format != FORMAT:
        raise ShardError(f"{path} has format {manifest.format!r}, this version reads {FORMAT!r}; rebuild the shards")
    return manifest


class ShardReader:
    """Random access to the samples of one shard, checking every tar header it reads."""

    def __init__(self, path: str | Path, info: ShardInfo, seq_len: int, dtype: str):
        self.path, self.info, self.seq_len, self.dtype = Path(path), info, seq_len, np.dtype(dtype)
        self.stride = member_stride(seq_len, dtype)
        self.data_offset = TAR_BLOCK + npy_header_size(seq_len, dtype)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples [start, stop) as int64 [n, seq_len] and a bool [n]: False where a sample is unreadable."""
        n = stop - start
        with open(self.path, "rb") as stream:
            stream.seek(start * self.stride)
            raw = stream.read(n * self.stride)
        buffer = np.zeros(n * self.stride, dtype=np.uint8)
        buffer[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        rows = buffer.reshape(n, self.stride)
        ok = self._headers_ok(rows[:, :TAR_BLOCK], start)
        ok &= np.arange(1, n + 1) * self.stride <= len(raw)  # a truncated file ends mid-sample
        token_bytes = rows[:, self.data_offset: self.data_offset + self.seq_len * self.dtype.itemsize]
        tokens = np.ascontiguousarray(token_bytes).view(self.dtype.newbyteorder("<")).astype(np.int64)
        return tokens.reshape(n, self.seq_len), ok

    def _headers_ok(self, headers: np.ndarray, start: int) -> np.ndarray:
        # A tar header's checksum is the byte sum with its own 8-byte field counted as spaces.
        field_sum = headers[:, 148:156].astype(np.int64).sum(axis=1)
        computed = headers.astype(np.int64).sum(axis=1) - field_sum + 8 * ord(" ")
        ok = np.empty(len(headers), dtype=bool)
        for i, header in enumerate(headers):
            expected_name = member_name(self.info.first_key + start + i).encode()
            stored = bytes(header[148:156]).split(b"\0")[0].strip()
            try:
                checksum = int(stored, 8)
            except ValueError:
                checksum = -1
            ok[i] = checksum == computed[i] and bytes(header[: len(expected_name)]) == expected_name
        return ok
