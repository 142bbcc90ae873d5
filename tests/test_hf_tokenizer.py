"""Hugging Face tokenizers (issue 18, item 3): a tokenizer.json + tokenizer_config.json folder, such
as LLaDA-8B's, imports as kind "hf" (special ids from its config, a mask token required), encodes
and decodes, renders its chat template as transformers does, and tokenizes SFT data that a tiny
LLaDA then fine-tunes on. The HF tokenizer is trained here, offline, on a few sentences."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from pretrain.checkpoint import load_model
from pretrain.cli import main as cli_main
from pretrain.metrics import read_metrics
from tests.dist.llada_worker import TINY
from tests.test_sft import read_split, write_jsonl
from tokenizer.hf import import_hf_tokenizer
from tokenizer.sft import HF_TEMPLATE, SFTDataError, read_info, shard_sft
from tokenizer.shard import shard_corpus, verify_shards
from tokenizer.storage import Store
from tokenizer.tokenizers import CONFIG_FILE, HF_CONFIG_FILE, HF_TOKENIZER_FILE, TokenizerError, load_tokenizer
from tokenizer.train import train_tokenizer
from tokenizer.transfer import local_tokenizer

tokenizers = pytest.importorskip("tokenizers", reason="the hf kind needs the tokenizers library "
                                 "(pip install -e .[hf-tokenizer]; CI installs it)")

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIALS = [BOS, EOS, HEADER, END_HEADER, EOT, MASK]
# LLaDA's template in spirit: a header per message, trimmed content, end-of-turn, BOS before the
# first message, then the assistant's header as the generation prompt.
TEMPLATE = ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
            "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}"
            "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
            "\n\n{% endif %}")
WORDS = ["red", "blue", "cat", "dog", "sun", "tree", "sky", "big", "what", "is", "the", "colour", "of"]
SENTENCES = ["the red cat sleeps under the big tree", "what is the colour of the sky", "blue sky, red sun",
             "a dog runs; a cat sleeps", "café naïve — 東京 😀", "numbers 0123456789 and symbols !?#@"]
SEQ_LEN = 64  # the longest rendered prompt (a system turn) is 51 tokens of this tiny BPE


def write_hf_folder(folder: Path, *, specials: list[str] = SPECIALS, config: dict | None = None) -> Path:
    """A byte-level BPE tokenizer.json trained on SENTENCES with `specials`, and a tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES + [" ".join(WORDS)] * 3, trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is None:
        config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
                  "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    """The source folder, its import, chat SFT records and their shards."""
    root = tmp_path_factory.mktemp("hf")
    source = write_hf_folder(root / "source")
    assert cli_main(["tokenizer", "import-hf", str(source), "--out", str(root / "tok")]) == 0
    rng = random.Random(0)
    records = []
    for index in range(60):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
        messages = [{"role": "user", "content": " ".join(words)},
                    {"role": "assistant", "content": " ".join(words[::-1])}]
        if index % 3 == 0:
            messages.insert(0, {"role": "system", "content": "answer backwards"})
        records.append({"messages": messages})
    chat = write_jsonl(root / "chat.jsonl", records)
    shard_sft(chat, root / "tok", SEQ_LEN, root / "shards", samples_per_shard=16, val_fraction=0.1)
    return {"root": root, "source": source, "tok": root / "tok", "chat": chat, "shards": root / "shards"}


def test_the_import_keeps_the_hf_files_apart_and_takes_special_ids_from_the_config(hf, tmp_path):
    tok = load_tokenizer(hf["tok"])
    backend = tokenizers.Tokenizer.from_file(str(hf["source"] / "tokenizer.json"))
    assert tok.kind == "hf"
    assert (hf["tok"] / HF_TOKENIZER_FILE).read_bytes() == (hf["source"] / "tokenizer.json").read_bytes()
    assert (hf["tok"] / HF_CONFIG_FILE).read_bytes() == (hf["source"] / "tokenizer_config.json").read_bytes()
    assert json.loads((hf["tok"] / CONFIG_FILE).read_text())["kind"] == "hf"  # the project's own config
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == tuple(
        backend.token_to_id(t) for t in (BOS, EOS, EOS, MASK))
    assert tok.vocab_size == backend.get_vocab_size(with_added_tokens=True)
    # sha256 covers the HF files: an edited chat template is refused.
    altered = tmp_path / "altered"
    altered.mkdir()
    (altered / "hf").mkdir()
    for name in (CONFIG_FILE, HF_TOKENIZER_FILE):
        (altered / name).write_bytes((hf["tok"] / name).read_bytes())
    config = json.loads((hf["tok"] / HF_CONFIG_FILE).read_text())
    (altered / HF_CONFIG_FILE).write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    with pytest.raises(TokenizerError, match="modified"):
        load_tokenizer(altered)


def test_encode_decode_round_trip_and_special_tokens(hf):
    tok = load_tokenizer(hf["tok"])
    for text in SENTENCES + ["  leading spaces\n\tand tabs  ", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.mask_id not in ids and tok.bos_id not in ids
    assert tok.encode_batch(SENTENCES) == [tok.encode(text) for text in SENTENCES]
    header = tok.encode(f"{HEADER}user{END_HEADER}")  # a template's special tokens become their ids
    assert header[0] == tok.backend.token_to_id(HEADER) and header[-1] == tok.backend.token_to_id(END_HEADER)
    red = tok.encode("red")
    assert tok.decode([tok.bos_id, *red, tok.mask_id, *red, tok.eos_id, tok.pad_id]) == "red[MASK]red"


def test_the_chat_template_renders_as_written_and_as_transformers_renders_it(hf):
    tok = load_tokenizer(hf["tok"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  what is red? "}]
    expected = (f"{BOS}{HEADER}system{END_HEADER}\n\nbe brief{EOT}{HEADER}user{END_HEADER}\n\nwhat is red?{EOT}"
                f"{HEADER}assistant{END_HEADER}\n\n")
    assert tok.chat_prompt(messages) == expected
    assert tok.chat_prompt(messages, strip_bos=True) == expected[len(BOS):]
    assert load_tokenizer(hf["tok"]).chat_template_sha256 == tok.chat_template_sha256 is not None
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(hf["tok"] / "hf"))  # hf/ is a folder HF loads
    assert reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert reference(expected, add_special_tokens=False)["input_ids"] == tok.encode(expected)


def test_kinds_without_a_template_render_none_and_a_broken_template_names_the_record(hf, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("abc")
    char = train_tokenizer(str(tmp_path / "docs"), "char", tmp_path / "char")
    assert char.chat_prompt([{"role": "user", "content": "a"}]) is None and char.chat_template_sha256 is None
    config = {"bos_token": BOS, "eos_token": EOS, "chat_template": "{{ raise_exception('no system role') }}"}
    assert cli_main(["tokenizer", "import-hf", str(write_hf_folder(tmp_path / "src", config=config)),
                     "--out", str(tmp_path / "tok")]) == 0
    with pytest.raises(SFTDataError, match=r"chat.jsonl:1: the chat template .* no system role"):
        shard_sft(hf["chat"], tmp_path / "tok", SEQ_LEN, tmp_path / "out")


def test_a_mask_token_is_required_and_can_be_named(tmp_path, capsys):
    plain = ["<s>", "</s>", "<mask>"]
    source = write_hf_folder(tmp_path / "src", specials=plain, config={"bos_token": "<s>", "eos_token": "</s>"})
    assert cli_main(["tokenizer", "import-hf", str(source), "--out", str(tmp_path / "a")]) != 0
    assert "no mask token" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match="no mask token.*pass --mask-token TOKEN"):
        import_hf_tokenizer(source, tmp_path / "a")
    with pytest.raises(TokenizerError, match=r"'<nope>' \(--mask-token\) is not in the vocabulary"):
        import_hf_tokenizer(source, tmp_path / "a", mask_token="<nope>")
    with pytest.raises(TokenizerError, match="also BOS, EOS or PAD"):
        import_hf_tokenizer(source, tmp_path / "a", mask_token="</s>")
    assert cli_main(["tokenizer", "import-hf", str(source), "--out", str(tmp_path / "a"), "--mask-token",
                     "<mask>"]) == 0
    tok = load_tokenizer(tmp_path / "a")
    assert tok.mask_id == tok.backend.token_to_id("<mask>") and tok.pad_id == tok.eos_id  # no pad_token: EOS
    assert tok.chat_prompt([{"role": "user", "content": "x"}]) is None  # no chat_template
    assert "chat template none" in capsys.readouterr().out


def test_a_hub_cache_entry_imports_by_name_with_a_separate_template_file(tmp_path, monkeypatch):
    entry = tmp_path / "hub" / "models--GSAI-ML--tiny"
    snapshot = write_hf_folder(entry / "snapshots" / "abc123",
                               config={"bos_token": BOS, "eos_token": {"content": EOS, "special": True},
                                       "pad_token": EOS})  # an AddedToken's serialised form counts too
    (snapshot / "chat_template.jinja").write_text(TEMPLATE)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli_main(["tokenizer", "import-hf", "GSAI-ML/tiny", "--out", str(tmp_path / "tok")]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.chat_prompt([{"role": "user", "content": "hi"}]) == \
        f"{BOS}{HEADER}user{END_HEADER}\n\nhi{EOT}{HEADER}assistant{END_HEADER}\n\n"
    assert tok.config["info"]["merged_into_tokenizer_config"] == ["chat_template from chat_template.jinja"]


def test_sft_shards_record_the_rendered_prompt_token_count(hf):
    tok = load_tokenizer(hf["tok"])
    records = [json.loads(line)["messages"] for line in hf["chat"].read_text().splitlines()]
    rendered = {tuple(tok.encode(tok.chat_prompt(m[:-1]))): m[-1]["content"] for m in records}
    seen = 0
    for split in ("train", "val"):
        for row, length in zip(*read_split(hf["shards"], split)):
            prompt = tuple(int(i) for i in row[:length])
            assert prompt[0] == tok.bos_id and prompt in rendered  # the template's BOS is the sample's BOS
            answer = tok.encode(rendered[prompt])
            assert row[length:length + len(answer)].tolist() == answer
            assert (row[length + len(answer):] == tok.eos_id).all()
            seen += 1
    assert seen == len(records)
    stats = json.loads((hf["shards"] / "manifest.json").read_text())["stats"]
    assert stats["train_dropped_samples"] == stats["val_dropped_samples"] == stats["train_truncated"] == 0
    info = read_info(hf["shards"])
    assert info["template"] == HF_TEMPLATE and info["template_sha256"] == tok.chat_template_sha256


def test_a_remote_style_tokenizer_copy_keeps_the_hf_subfolder(hf, tmp_path, monkeypatch):
    """The shard folder's tokenizer copy, fetched file by file as for a URL, keeps hf/ and loads."""
    monkeypatch.setenv("PROSECO_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(hf["tok"])
    copy = load_tokenizer(local_tokenizer(Store(hf["shards"]), tok.sha256))
    assert copy.sha256 == tok.sha256 and copy.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])
    # Plain text shards with it too, and their folder verifies (its tokenizer copy holds hf/).
    docs = tmp_path / "docs"
    docs.mkdir()
    for index, sentence in enumerate(SENTENCES):
        (docs / f"{index}.txt").write_text(sentence)
    shard_corpus(str(docs), hf["tok"], seq_len=16, out=tmp_path / "text", packing="pack", workers=1,
                 val_fraction=0.2)
    assert verify_shards(tmp_path / "text") == []


def test_a_tiny_llada_fine_tunes_on_hf_tokenized_sft_data_through_the_cli(hf, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *TINY, f"data.shards={hf['shards']}", f"logging.run_dir={run_dir}", "train.max_steps=6",
            "optim.lr=3e-3", "train.eval_every=6", "train.eval_batches=1", "checkpoint.every=0",
            "sampling.num_samples=2", "sampling.batch_size=2", "sampling.steps=4", "logging.log_every=1"]
    assert cli_main(args) == 0
    rows = read_metrics(run_dir)
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < losses[0]
    assert any(r.get("split") == "val" and math.isfinite(r["mdlm_nelbo"]) for r in rows)
    assert "held-out prompts of the val split" in (run_dir / "samples.md").read_text()
    assert load_model(run_dir)[2].sha256 == load_tokenizer(hf["tok"]).sha256  # the run keeps the hf folder
