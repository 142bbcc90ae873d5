"""Tokenizers behind one interface: SentencePiece (BPE/unigram), characters, GPT-2 BPE, and
Hugging Face `tokenizers` files (e.g. LLaDA-8B's own, with its chat template).

A tokenizer lives in a self-contained folder::

    tokenizer.json     kind, vocab_size, special ids, sha256, and whatever the kind needs
    spm.model          SentencePiece model (kind "sentencepiece")
    gpt2.tiktoken      GPT-2 r50k ranks (kind "gpt2"); the char kind keeps its alphabet in tokenizer.json
    hf/                kind "hf": a Hugging Face tokenizer folder, hf/tokenizer.json (the fast
                       tokenizer) and hf/tokenizer_config.json (special tokens, chat template); the
                       subfolder keeps HF's own file names apart from the project's tokenizer.json,
                       and is itself loadable by transformers' AutoTokenizer (tokenizer/hf.py imports it)

`vocab_size` counts every id the model can see, specials and the mask included: it is the number
of embedding rows. `sha256` hashes tokenizer.json (without the sha256 field and the descriptive
"info" block) and the model files, so two folders with the same hash tokenize identically;
`load_tokenizer` recomputes it and refuses a folder whose files changed after it was written.
"""

from __future__ import annotations

import base64
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pretrain.errors import UserError

CONFIG_FILE = "tokenizer.json"
SPM_MODEL_FILE = "spm.model"
GPT2_RANKS_FILE = "gpt2.tiktoken"
HF_DIR = "hf"
HF_TOKENIZER_FILE = f"{HF_DIR}/tokenizer.json"
HF_CONFIG_FILE = f"{HF_DIR}/tokenizer_config.json"
MODEL_FILES = {"sentencepiece": (SPM_MODEL_FILE,), "char": (), "gpt2": (GPT2_RANKS_FILE,),
               "hf": (HF_TOKENIZER_FILE, HF_CONFIG_FILE)}
MASK_TEXT = "[MASK]"
"""How `decode` renders a mask id, so that unfilled positions stay visible in samples."""

# SentencePiece escapes spaces as U+2581 and unescapes every U+2581 back to a space, so a literal
# U+2581 in the input would come back as " ". We encode it through its byte-fallback pieces instead,
# which SentencePiece decodes to the literal character.
SPM_SPACE_SYMBOL = "\u2581"


class TokenizerError(UserError):
    """A tokenizer folder that cannot be used, or a tokenizer that cannot be made as asked."""


class UnknownCharacterError(TokenizerError):
    """Text holds a character outside a char tokenizer's alphabet (the char kind has no unk id)."""


def _as_int_list(ids: Any) -> list[int]:
    """Accept lists, numpy arrays and (CPU) torch tensors of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class Tokenizer(ABC):
    """Text <-> ids. Subclasses implement `encode` and `_decode_plain` (ids without specials)."""

    kind: str

    def __init__(self, config: dict[str, Any], folder: Path):
        self.folder = folder
        self.config = config
        self.vocab_size: int = int(config["vocab_size"])
        self.mask_id: int = int(config["mask_id"])
        self.pad_id: int = int(config["pad_id"])
        self.bos_id: int = int(config["bos_id"])
        self.eos_id: int = int(config["eos_id"])
        self.sha256: str = config["sha256"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, folder={str(self.folder)!r})"

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no BOS/EOS added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_array(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int64) and the number of ids of each text: what sharding needs."""
        encoded = self.encode_batch(texts)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    @abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Text of ids that hold no special ids."""

    @property
    def chat_template_sha256(self) -> str | None:
        """sha256 of the chat template `chat_prompt` renders; None for kinds without one."""
        return None

    def chat_prompt(self, messages: list[dict[str, Any]], *, strip_bos: bool = False) -> str | None:
        """The text a model sees before it answers `messages`, rendered by the tokenizer's own chat
        template with the generation prompt; None: this kind has no chat template.

        strip_bos: drop the BOS token's text the template puts first (SFT samples begin with the
        BOS id already).
        """
        return None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: BOS/EOS/PAD dropped, each mask id rendered as "[MASK]"."""
        dropped = {self.bos_id, self.eos_id, self.pad_id}
        parts: list[str] = []
        run: list[int] = []
        for i in _as_int_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i == self.mask_id:
                parts += [self._decode_plain(run), MASK_TEXT]
                run = []
            elif i not in dropped:
                run.append(i)
        parts.append(self._decode_plain(run))
        return "".join(parts)

    def decode_document(self, ids: Iterable[int], strict: bool = False) -> str:
        """The document in a sample: after an optional leading BOS, up to the first EOS, PAD dropped.

        strict: a document with a special id inside it (PAD, BOS or a leftover mask before the EOS)
        is not a document: return "" rather than text glued together around the gap (a sampled
        SMILES must not become valid by dropping a stray PAD).
        """
        ids = _as_int_list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        if strict and any(i in (self.pad_id, self.bos_id, self.mask_id) for i in ids):
            return ""
        return self.decode(ids)


class SentencePieceTokenizer(Tokenizer):
    """A lossless SentencePiece BPE or unigram model (identity normalizer, byte fallback)."""

    kind = "sentencepiece"

    def __init__(self, config: dict[str, Any], folder: Path):
        import sentencepiece as spm

        super().__init__(config, folder)
        self.processor = spm.SentencePieceProcessor(model_file=str(folder / SPM_MODEL_FILE))
        self.unk_id = int(config["unk_id"])
        self._space_symbol_ids = [self.processor.piece_to_id(f"<0x{b:02X}>") for b in SPM_SPACE_SYMBOL.encode()]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: sharding parallelises over processes, each running this.
        encoded = self.processor.encode(list(texts), num_threads=1)
        for index, text in enumerate(texts):
            if SPM_SPACE_SYMBOL in text:
                encoded[index] = self._encode_with_space_symbols(text)
        return encoded

    def _encode_with_space_symbols(self, text: str) -> list[int]:
        parts = self.processor.encode(text.split(SPM_SPACE_SYMBOL), num_threads=1)
        ids = list(parts[0])
        for part in parts[1:]:
            ids += self._space_symbol_ids + part
        return ids

    def _decode_plain(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (e.g. SMILES); encoding is vectorised with numpy.

    Ids: pad 0, bos 1, eos 2, mask 3, then the alphabet in code point order. There is no unk id:
    a character outside the alphabet raises `UnknownCharacterError` naming it, because silently
    mapping it (say, an unseen atom in a SMILES) would corrupt the data.
    """

    kind = "char"

    def __init__(self, config: dict[str, Any], folder: Path):
        super().__init__(config, folder)
        self.alphabet: str = config["alphabet"]
        self.first_char_id = int(config["first_char_id"])
        self._codes = np.array([ord(c) for c in self.alphabet], dtype=np.uint32)
        if len(self._codes) == 0 or np.any(np.diff(self._codes.astype(np.int64)) <= 0):
            raise TokenizerError(f"{folder / CONFIG_FILE}: the alphabet must be non-empty, sorted and without "
                                 "repeats; retrain with `proseco tokenizer train --kind char`")
        self._id_to_text = [""] * self.first_char_id + list(self.alphabet)

    def encode(self, text: str) -> list[int]:
        return self.encode_array([text])[0].tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        flat, lengths = self.encode_array(texts)
        return [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])] if texts else []

    def encode_array(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # UTF-32 gives one 4-byte code per character, so the whole batch is one array lookup.
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4")
        positions = np.searchsorted(self._codes, codes)
        known = self._codes[np.minimum(positions, len(self._codes) - 1)] == codes
        if not known.all():
            char = chr(int(codes[np.argmin(known)]))
            raise UnknownCharacterError(
                f"character {char!r} (U+{ord(char):04X}) is not in the alphabet of the char tokenizer "
                f"{self.folder}; retrain it on a corpus that contains it or remove it from the text")
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        return positions.astype(np.int64) + self.first_char_id, lengths

    def _decode_plain(self, ids: list[int]) -> str:
        return "".join(self._id_to_text[i] for i in ids)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a .tiktoken file ("<base64 token> <rank>" per line).

    tiktoken's own loader also caches every file it reads under the system temp folder, keyed by
    path only; reading the file directly avoids that side effect (and stale cache hits).
    """
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class GPT2Tokenizer(Tokenizer):
    """GPT-2's r50k BPE through tiktoken, from the ranks file in the folder (works offline).

    Ids 0..50255 are GPT-2's, 50256 is <|endoftext|> (EOS, also BOS: MDLM wraps OpenWebText with
    it), 50257 is the mask (as the paper's OWT models), so vocab_size is 50258. PAD is also 50256:
    GPT-2 has no pad token, and giving it 50257 would collide with the mask.
    """

    kind = "gpt2"

    def __init__(self, config: dict[str, Any], folder: Path):
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError(f"{folder} is a gpt2 tokenizer, which needs tiktoken: "
                                 "pip install 'tiktoken>=0.7' (the [gpt2] extra)") from None
        super().__init__(config, folder)
        ranks = read_tiktoken_ranks(folder / GPT2_RANKS_FILE)
        self.encoding = tiktoken.Encoding(
            name=config["encoding_name"], pat_str=config["pattern"], mergeable_ranks=ranks,
            special_tokens={config["endoftext"]: self.eos_id})

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" in the text is ordinary text, never the special id.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=1)

    def _decode_plain(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json as text: a string, or an AddedToken dict's content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_tokens(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The special tokens a chat template sees (bos_token, eos_token, ...), as transformers passes
    them: only those tokenizer_config.json names, so a template tests `bos_token` as it would there."""
    tokens: dict[str, Any] = {}
    for key, value in hf_config.items():
        if key.endswith("_token") and token_text(value) is not None:
            tokens[key] = token_text(value)
    extra = hf_config.get("additional_special_tokens")
    if isinstance(extra, list):
        tokens["additional_special_tokens"] = [t for t in map(token_text, extra) if t is not None]
    return tokens


def chat_template_of(hf_config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat template: a string, or the one named "default" of a list."""
    template = hf_config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_tag() -> type:
    """A jinja2 extension for transformers' `{% generation %}...{% endgeneration %}` blocks (they
    mark the assistant's text for training masks): rendering keeps their body as it is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


def compile_chat_template(template: str, where: Path):
    """A jinja2 template in a sandbox, as transformers compiles chat templates: blocks trimmed,
    loop controls, `raise_exception`, a `tojson` that keeps non-ASCII text, `strftime_now`."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_generation_tag(), "jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateError as err:
        raise TokenizerError(f"{where}: the chat template does not compile ({type(err).__name__}: {err}); "
                             "fix it in the source folder and import it again") from None


def import_tokenizers_library(folder: Path):
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"{folder} is a Hugging Face tokenizer, which needs the tokenizers library: "
                             "pip install 'tokenizers>=0.19' (the [hf-tokenizer] extra)") from None
    return tokenizers


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (hf/tokenizer.json, read with the `tokenizers` library) and its
    tokenizer_config.json: special ids resolved at import and recorded in the project's config.

    Text is encoded as transformers encodes with add_special_tokens=False: nothing is added, and a
    special token's text in the input (e.g. "<|eot_id|>" from a chat template) becomes its id.
    Decoding keeps the special tokens other than BOS/EOS/PAD/mask visible as their text.
    """

    kind = "hf"

    def __init__(self, config: dict[str, Any], folder: Path):
        tokenizers = import_tokenizers_library(folder)
        super().__init__(config, folder)
        self.backend = tokenizers.Tokenizer.from_file(str(folder / HF_TOKENIZER_FILE))
        self.hf_config: dict[str, Any] = json.loads((folder / HF_CONFIG_FILE).read_text(encoding="utf-8"))
        self.special_tokens: dict[str, str] = dict(config["special_tokens"])
        self.template_tokens = template_tokens(self.hf_config)
        self.chat_template = chat_template_of(self.hf_config)
        self._compiled = None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_plain(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    @property
    def chat_template_sha256(self) -> str | None:
        if self.chat_template is None:
            return None
        return hashlib.sha256(self.chat_template.encode("utf-8")).hexdigest()

    def chat_prompt(self, messages: list[dict[str, Any]], *, strip_bos: bool = False) -> str | None:
        if self.chat_template is None:
            return None
        import jinja2

        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template, self.folder / HF_CONFIG_FILE)
        try:
            text = self._compiled.render(messages=messages, add_generation_prompt=True, **self.template_tokens)
        except jinja2.exceptions.TemplateError as err:
            raise TokenizerError(f"the chat template of {self.folder} failed on these messages "
                                 f"({type(err).__name__}: {err})") from None
        bos = self.template_tokens.get("bos_token")
        if strip_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text


TOKENIZER_CLASSES: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (SentencePieceTokenizer, CharTokenizer, GPT2Tokenizer, HFTokenizer)}


def compute_sha256(folder: Path, config: dict[str, Any]) -> str:
    """Identity of a tokenizer: its config and the bytes of its model files.

    The sha256 field itself and "info" (where and from what it was trained) are left out, so the
    same model trained from a copy of a corpus elsewhere has the same identity.
    """
    digest = hashlib.sha256()
    identity = {key: value for key, value in config.items() if key not in ("sha256", "info")}
    digest.update(json.dumps(identity, sort_keys=True, ensure_ascii=True).encode())
    for name in MODEL_FILES[config["kind"]]:
        digest.update(b"\0" + name.encode() + b"\0")
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def write_config(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write tokenizer.json with its sha256 filled in (the model files must already be in `folder`)."""
    config = {**config, "sha256": compute_sha256(folder, config)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return config


def read_config(folder: str | Path) -> dict[str, Any]:
    """tokenizer.json of a folder, checked for the fields every kind needs and for its model files."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    hint = "create one with `proseco tokenizer train --corpus NAME --kind bpe --vocab-size N --out DIR`"
    if not path.is_file():
        raise TokenizerError(f"{folder} is not a tokenizer folder (no {CONFIG_FILE}); {hint}")
    try:
        config = json.loads(path.read_text())
        kind = config["kind"]
        for key in ("vocab_size", "mask_id", "pad_id", "bos_id", "eos_id", "sha256"):
            config[key]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TokenizerError(f"{path} is unreadable or incomplete ({type(err).__name__}: {err}); {hint}") from None
    if kind not in TOKENIZER_CLASSES:
        raise TokenizerError(f"{path} has unknown kind {kind!r} (known: {', '.join(TOKENIZER_CLASSES)}); {hint}")
    for name in MODEL_FILES[kind]:
        if not (folder / name).is_file():
            raise TokenizerError(f"{folder} lacks {name}, which a {kind} tokenizer needs; "
                                 f"copy the whole folder or {hint}")
    return config


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in folder `path`, after checking that its files still match its sha256."""
    folder = Path(path)
    config = read_config(folder)
    actual = compute_sha256(folder, config)
    if actual != config["sha256"]:
        raise TokenizerError(f"{folder}: files hash to {actual[:16]}..., {CONFIG_FILE} records "
                             f"{config['sha256'][:16]}...; the folder was modified after training: retrain it")
    try:
        return TOKENIZER_CLASSES[config["kind"]](config, folder)
    except (KeyError, ValueError, OSError, RuntimeError) as err:
        if isinstance(err, UserError):
            raise
        raise TokenizerError(f"{folder} cannot be loaded as a {config['kind']} tokenizer "
                             f"({type(err).__name__}: {err}); retrain it") from None
