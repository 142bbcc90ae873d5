"""ProSeCo SFT (issue 18, item 3): prompt/response records into shards with prompt lengths, the
loaders hand them out (also across a resume on another layout), and the loss is LLaDA's SFT loss:
the prompt is never masked and never in either loss, each sample normalised by its response length."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.runner import LocalRunner
from pretrain.checkpoint import load_model
from pretrain.cli import main as cli_main
from pretrain.config import DiffusionConfig, SamplingConfig
from pretrain.data import TrainLoader, eval_batches
from pretrain.data.prompts import PromptLengthError
from pretrain.diffusion import NEG_INF, NoiseSchedule, add_noise, sample_t
from pretrain.errors import UserError
from pretrain.metrics import read_metrics
from pretrain.models import ModelShape
from pretrain.models.llada.config import LLaDAConfig
from pretrain.models.llada.model import LLaDA
from pretrain.sft import answer_held_out, block_length_for, held_out_prompts
from pretrain.step import Objective, forward_backward
from tests.dist.llada_worker import TINY
from tokenizer.sft import SFTDataError, iter_pairs, render_prompt, shard_sft
from tokenizer.tokenizers import load_tokenizer
from tokenizer.train import train_tokenizer

WORDS = ["red", "blue", "cat", "dog", "sun", "tree", "sky", "big"]
SEQ_LEN = 48


def questions(count: int) -> list[tuple[str, str]]:
    """(question, answer) pairs: the answer is the question's words reversed (learnable)."""
    rng = random.Random(0)
    pairs = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
        pairs.append((" ".join(words), " ".join(reversed(words))))
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The same 80 question/answer records as chat messages and as prompt/response fields, a
    record whose prompt cannot fit, a char tokenizer over their rendered text, and both sharded."""
    root = tmp_path_factory.mktemp("sft")
    pairs = questions(80)
    too_long = " ".join(["tree"] * 20)  # BOS + its rendered prompt alone fill more than SEQ_LEN
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    chat.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": too_long},
                              {"role": "assistant", "content": "tree"}]})
    fields = [{"prompt": q, "response": a} for q, a in pairs]
    fields.append({"prompt": too_long, "response": "tree"})
    paths = {"chat": write_jsonl(root / "chat.jsonl", chat), "fields": write_jsonl(root / "fields.jsonl", fields)}
    docs = root / "docs"
    docs.mkdir()
    text = "".join(p.prompt + p.response + "\n" for p in iter_pairs(paths["chat"], "train", val_fraction=0.0))
    (docs / "all.txt").write_text(text + "system: be brief\n")
    train_tokenizer(str(docs), "char", root / "tok")
    for name in ("chat", "fields"):
        shard_sft(paths[name], root / "tok", SEQ_LEN, root / f"shards-{name}", samples_per_shard=16,
                  val_fraction=0.1)
    return {"root": root, "tok": root / "tok", **paths,
            "shards": root / "shards-chat", "shards_fields": root / "shards-fields"}


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of a split and its prompt length, in manifest order, through the eval loader."""
    tokens, lengths = [], []
    for batch in eval_batches(folder, split, micro_batch_size=8):
        valid = batch["valid"].numpy()
        tokens.append(batch["tokens"].numpy()[valid])
        lengths.append(batch["prompt_length"].numpy()[valid])
    return np.concatenate(tokens), np.concatenate(lengths)


# -- data ------------------------------------------------------------------------------------------

def test_chat_and_prompt_response_records_give_the_same_samples_and_prompt_lengths(corpus):
    tok = load_tokenizer(corpus["tok"])
    manifest = json.loads((corpus["shards"] / "manifest.json").read_text())
    assert manifest["packing"] == "sft"
    stats = manifest["stats"]
    assert stats["train_dropped_samples"] + stats["val_dropped_samples"] == 1  # the long prompt alone
    assert stats["train_samples"] + stats["val_samples"] == 80 and stats["val_samples"] >= 1
    expected = dict(questions(80))
    for split in ("train", "val"):
        tokens, lengths = read_split(corpus["shards"], split)
        other_tokens, other_lengths = read_split(corpus["shards_fields"], split)
        assert np.array_equal(tokens, other_tokens) and np.array_equal(lengths, other_lengths)
        for row, length in zip(tokens, lengths):
            assert row[0] == tok.bos_id
            prompt = tok.decode(row[1:length])
            assert prompt.startswith("user: ") and prompt.endswith("\nassistant: ")
            question = prompt[len("user: "):-len("\nassistant: ")]
            assert prompt == render_prompt([{"role": "user", "content": question}])
            answer = expected[question]
            response = row[length:]
            assert tok.decode(response[:len(answer)]) == answer
            assert (response[len(answer):] == tok.eos_id).all() and len(response) > len(answer)  # EOS-padded


def test_a_response_too_long_keeps_its_first_tokens_and_bad_records_name_the_line(corpus, tmp_path):
    long_answer = "sky " * 10
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "big", "response": long_answer},
                                                 {"prompt": "sun", "response": "dog"}])
    manifest = shard_sft(path, corpus["tok"], 30, tmp_path / "out", val_fraction=0.0)
    assert manifest.stats["train_truncated"] == 1 and manifest.stats["train_dropped_samples"] == 0
    tok = load_tokenizer(corpus["tok"])
    for row, length in zip(*read_split(tmp_path / "out", "train")):
        if tok.decode(row[1:length]) == "user: big\nassistant: ":
            assert tok.decode(row[length:]) == long_answer[:30 - length]  # cut, no EOS
            assert tok.eos_id not in row[length:]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "sun"}]}])
    with pytest.raises(SFTDataError, match=r"bad.jsonl:1: the last message .* \"assistant\""):
        shard_sft(bad, corpus["tok"], 16, tmp_path / "bad")
    with pytest.raises(SFTDataError, match="prompt too long|raise --seq-len"):
        shard_sft(path, corpus["tok"], 5, tmp_path / "short", val_fraction=0.0)


def test_the_command_line_writes_the_same_folder(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["tokenizer", "shard", "--packing", "sft", "--corpus", str(corpus["chat"]), "--tokenizer",
                     str(corpus["tok"]), "--seq-len", str(SEQ_LEN), "--out", str(out), "--samples-per-shard", "16",
                     "--val-fraction", "0.1", "--workers", "1"]) == 0
    assert "1 dropped: prompt too long" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == \
        json.loads((corpus["shards"] / "manifest.json").read_text())["fingerprint"]
    assert cli_main(["tokenizer", "verify", str(out)]) == 0
    assert cli_main(["tokenizer", "shard", "--packing", "sft", "--corpus", str(corpus["chat"]), "--tokenizer",
                     str(corpus["tok"]), "--seq-len", str(SEQ_LEN), "--out", str(tmp_path / "x"),
                     "--text-field", "a"]) != 0  # a flag of text corpora is refused by name
    assert "--text-field does not apply to --packing sft" in capsys.readouterr().err


def test_prompt_lengths_are_checked_against_the_shards(corpus, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(corpus["shards"], folder)
    info_path = folder / "prompt_lengths" / "info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fingerprint": "0" * 16}))
    with pytest.raises(PromptLengthError, match="written for other shards"):
        eval_batches(folder, "val", micro_batch_size=2)
    info_path.write_text(json.dumps(info))
    values = np.load(folder / "prompt_lengths" / "val.npy")
    np.save(folder / "prompt_lengths" / "val.npy", values + 1)
    with pytest.raises(PromptLengthError, match="differs from the sha256"):
        eval_batches(folder, "val", micro_batch_size=2)
    (folder / "prompt_lengths" / "val.npy").unlink()
    with pytest.raises(PromptLengthError, match="cannot read"):
        eval_batches(folder, "val", micro_batch_size=2)


def test_resume_on_another_layout_keeps_each_sample_with_its_prompt_length(corpus):
    """A training stream read at dp=1, saved after two steps and resumed at dp=2 (and with other
    micro-batches): every sample arrives with the prompt length the eval pass gives it."""
    tokens, lengths = read_split(corpus["shards"], "train")
    truth = {row.tobytes(): int(length) for row, length in zip(tokens, lengths)}

    def check(batch) -> None:
        for row, length, valid in zip(batch["tokens"].numpy().astype(tokens.dtype), batch["prompt_length"].numpy(),
                                      batch["valid"].numpy()):
            assert valid and truth[row.tobytes()] == length

    first = TrainLoader(corpus["shards"], global_batch_size=8, micro_batch_size=4, num_workers=0, seed=3)
    seen = []
    for _, batch in zip(range(4), first):  # two optimizer steps of two micro-batches
        check(batch)
        seen.append(batch["position"])
    assert sorted(torch.cat(seen).tolist()) == list(range(16))
    state = first.state_dict()
    resumed_positions = []
    for rank in range(2):
        loader = TrainLoader(corpus["shards"], global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=2,
                             num_workers=0, seed=3)
        loader.load_state_dict(state)
        for _, batch in zip(range(4), loader):
            check(batch)
            resumed_positions.append(batch["position"])
    assert sorted(torch.cat(resumed_positions).tolist()) == list(range(16, 32))  # steps 2 and 3, exactly


# -- loss ------------------------------------------------------------------------------------------

def tiny_llada(vocab_size: int) -> LLaDA:
    cfg = LLaDAConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=vocab_size,
                      vocab_multiple=8, seq_len=12)
    torch.manual_seed(0)
    return LLaDA(cfg, ModelShape.of(cfg)).eval()


@pytest.mark.parametrize("chunk, mode", [(0, "reuse"), (5, "reuse"), (5, "two_pass")])
def test_the_response_only_loss_equals_a_hand_computation(chunk, mode):
    """Both passes of ProSeCo on a batch of two SFT samples, against the loss written out by hand
    from the tiny model's logits: MDLM terms on masked response tokens, corrector terms (errors
    up-weighted) on every response token, each sample's sum / its response length, averaged."""
    vocab, mask_id, length = 20, 3, 12
    model = tiny_llada(vocab)
    cfg = DiffusionConfig(loss_chunk_tokens=chunk)
    objective = Objective.build(cfg, mask_id=mask_id, vocab_size=vocab, seed=7, global_batch_size=2)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(4, vocab, (2, length), generator=gen)
    prompt_length = torch.tensor([4, 9])
    batch = {"tokens": x0, "position": torch.tensor([10, 11]), "valid": torch.tensor([True, True]),
             "prompt_length": prompt_length}
    sums = forward_backward(LocalRunner(model), [batch], objective, step=0, mode=mode, backward_scale=1.0)
    loss = sums.loss / (2 * length)  # what training divides by: valid samples x L

    # By hand: the same t and masks (keyed), the prompt put back, then the two passes.
    t = sample_t(7, batch["position"], 2, cfg.sampling_eps_training, cfg.antithetic_sampling)
    sigma, dsigma = NoiseSchedule(cfg)(t)
    weight = dsigma / torch.expm1(sigma)  # 1/t for loglinear
    noised = add_noise(x0, batch["position"], batch["valid"], cfg=cfg, schedule=NoiseSchedule(cfg), mask_id=mask_id,
                       seed=7, global_batch_size=2, eps=cfg.sampling_eps_training)  # without prompt lengths
    prompt = torch.arange(length)[None] < prompt_length[:, None]
    zt = torch.where(prompt, x0, noised.zt)
    assert (zt[prompt] == x0[prompt]).all() and (zt[~prompt] == mask_id).any()

    def log_probs(tokens):
        with torch.no_grad():
            logits = model(tokens).float()[..., :vocab].clone()
        logits[..., mask_id] = NEG_INF
        return torch.log_softmax(logits, dim=-1)

    lp_zt = log_probs(zt)
    y = torch.where(prompt, x0, lp_zt.argmax(-1))  # corrector input: argmax everywhere but the prompt
    lp_y = log_probs(y)
    expected = []
    for b in range(2):
        mdlm = corrector = 0.0
        for pos in range(prompt_length[b], length):
            if zt[b, pos] == mask_id:
                mdlm += -weight[b] * lp_zt[b, pos, x0[b, pos]]
            logp = lp_y[b, pos, x0[b, pos]]
            corrector += weight[b] * (-logp if y[b, pos] != x0[b, pos] else -torch.exp(logp))
        expected.append((mdlm + corrector) / (length - prompt_length[b]))
    assert loss.item() == pytest.approx(float(sum(expected) / 2), rel=1e-5)
    assert sums.tokens.item() == pytest.approx(2 * length, rel=1e-6)  # the weights sum to L per sample


def test_prompt_tokens_are_never_masked_and_stay_in_the_corrector_input():
    cfg = DiffusionConfig(sampling_eps_training=0.99)  # t close to 1: nearly every response token masked
    length = 10
    x0 = torch.arange(4, 14).repeat(4, 1)
    prompt_length = torch.tensor([1, 3, 5, 9])
    noised = add_noise(x0, torch.arange(4), torch.ones(4, dtype=torch.bool), cfg=cfg, schedule=NoiseSchedule(cfg),
                       mask_id=3, seed=0, global_batch_size=4, eps=cfg.sampling_eps_training,
                       prompt_length=prompt_length)
    prompt = torch.arange(length)[None] < prompt_length[:, None]
    assert (noised.zt[prompt] == x0[prompt]).all() and (noised.zt[~prompt] == 3).float().mean() > 0.9
    assert (noised.token_mask[prompt] == 0).all()
    assert noised.token_mask.sum(1).tolist() == pytest.approx([length] * 4)
    objective = Objective.build(cfg, mask_id=3, vocab_size=20, seed=0, global_batch_size=4)
    scores = torch.randn(4, length, 20)
    y = objective.corrector_input(scores, noised, torch.arange(4))
    assert (y[prompt] == x0[prompt]).all()


# -- training through the CLI ----------------------------------------------------------------------

def test_a_tiny_llada_trains_proseco_sft_through_the_cli(corpus, tmp_path, monkeypatch):
    """`proseco train` on the SFT folder: every batch reaches the loss with the prompt lengths of
    its samples and an unmasked prompt, the losses are finite and fall, validation is
    response-only too; resumed from its checkpoint, the run keeps each sample with its own length."""
    import pretrain.step

    truth = {}
    for split in ("train", "val"):
        tokens, lengths = read_split(corpus["shards"], split)
        truth.update({row.astype(np.int64).tobytes(): int(length) for row, length in zip(tokens, lengths)})
    seen = []
    original = pretrain.step.add_noise

    def spy(x0, positions, valid, **kwargs):
        noised = original(x0, positions, valid, **kwargs)
        lengths = kwargs.get("prompt_length")
        prompt = torch.arange(x0.shape[1])[None] < lengths[:, None]
        aligned = all(truth[row.numpy().tobytes()] == length for row, length, ok in zip(x0, lengths.tolist(), valid)
                      if ok)
        seen.append(aligned and bool((noised.zt[prompt] == x0[prompt]).all())
                    and bool((noised.token_mask[prompt] == 0).all()))
        return noised

    monkeypatch.setattr(pretrain.step, "add_noise", spy)
    run_dir = tmp_path / "run"
    args = ["train", *TINY, f"data.shards={corpus['shards']}", f"logging.run_dir={run_dir}", "train.max_steps=10",
            "optim.lr=3e-3", "train.eval_every=10", "train.eval_batches=1", "checkpoint.every=0",
            "sampling.num_samples=2", "sampling.batch_size=2", "sampling.steps=4", "logging.log_every=1",
            "diffusion.loss_chunk_tokens=64"]
    assert cli_main(args) == 0
    assert seen and all(seen)
    rows = read_metrics(run_dir)
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < losses[0]  # (here 8.61 at step 1, 5.11 over steps 8-10)
    val = [r for r in rows if r.get("split") == "val"]
    assert val and math.isfinite(val[-1]["mdlm_nelbo"])
    seen.clear()
    assert cli_main([*[a for a in args if not a.startswith("train.max_steps")], "train.max_steps=13"]) == 0
    assert len(seen) == 3 * 4 + 4 and all(seen)  # 3 resumed steps of 4 micro-batches, validation's 4
    assert [r["step"] for r in read_metrics(run_dir) if r.get("split") == "train"][-3:] == [11, 12, 13]

    # The end-of-run report answered held-out prompts of the val split (the sampler keeps each prompt).
    report = (run_dir / "samples.md").read_text()
    assert "answers to 2 held-out prompts of the val split" in report and "exact match" in report
    model, cfg, tok = load_model(run_dir)
    examples = held_out_prompts(corpus["shards"], "val", 3, eos_id=tok.eos_id)
    val_tokens, val_lengths = read_split(corpus["shards"], "val")
    assert [len(e.prompt) for e in examples] == val_lengths[:3].tolist()
    sampling = dataclasses.replace(cfg.sampling, block_length=4, steps=12, early_eos_stop=True, corrector_steps=1)
    rows = answer_held_out(model, cfg, tok, sampling, torch.device("cpu"), examples)
    for example, row in zip(examples, rows):
        generated = SEQ_LEN - len(example.prompt)
        assert generated % row["block_length"] == 0 and (row["block_length"] <= 4 or row["block_length"] == generated)
        assert 0 <= row["token_accuracy"] <= 1 and row["nfe_denoiser"] <= 12


def test_the_folder_records_its_template_and_sha256s(corpus):
    info = json.loads((corpus["shards"] / "prompt_lengths" / "info.json").read_text())
    manifest = json.loads((corpus["shards"] / "manifest.json").read_text())
    assert info["fingerprint"] == manifest["fingerprint"] and info["template"].startswith("plain-v1")
    for split in ("train", "val"):
        raw = (corpus["shards"] / "prompt_lengths" / f"{split}.npy").read_bytes()
        assert info["splits"][split]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert info["splits"][split]["samples"] == manifest["splits"][split]["samples"]


def test_held_out_prompts_need_an_sft_folder_and_blocks_fit_each_prompt(corpus, tmp_path):
    from tests.helpers import make_word_shards

    plain = make_word_shards(tmp_path, seq_len=16, documents=30)
    assert "prompt_length" not in next(iter(eval_batches(plain, "val", micro_batch_size=2)))
    with pytest.raises(UserError, match="--packing sft"):
        held_out_prompts(plain, "val", 2, eos_id=2)
    sampling = SamplingConfig(block_length=8, steps=8)
    assert block_length_for(sampling, 32) == 8  # 4 blocks, 2 steps each
    assert block_length_for(sampling, 24) == 6  # 8 makes 3 blocks, which 8 steps do not split; 6 makes 4
    assert block_length_for(sampling, 7) == 7  # one block
    assert block_length_for(SamplingConfig(), 24) is None  # no block sampler
