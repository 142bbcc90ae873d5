"""Models built on the meta device: keyed initialisation (the same weights on every layout, the
families' distributions), stages that hold only their own parts, and the memory of a build."""

import json
import math

import pytest
import torch
from torch import nn

import pretrain.models.init as keyed
from pretrain.models import ModelShape, count_parameters, get_family
from pretrain.models.dit.config import DiTConfig
from pretrain.models.dit.model import DiT
from pretrain.models.init import Init, fill_keyed, keyed_init, materialise
from pretrain.models.llada.config import LLaDAConfig
from pretrain.models.llada.model import LLaDA
from tests.helpers import torchrun

WORKER = "tests/dist/meta_worker.py"
DIT = DiTConfig(d_model=32, n_layers=3, n_heads=4, cond_dim=16, vocab_size=40, seq_len=8)
LLADA = LLaDAConfig(family="llada", d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                    vocab_size=40, seq_len=8)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("cls, cfg", [(DiT, DIT), (LLaDA, LLADA)])
def test_weights_are_a_function_of_the_seed_alone(cls, cfg):
    """Not of the global RNG or the device the model was built on; another seed, other weights."""
    torch.manual_seed(0)
    first = state(cls(cfg, ModelShape.of(cfg), seed=7))
    torch.manual_seed(1)
    second = state(cls(cfg, ModelShape.of(cfg), seed=7))
    meta = cls(cfg, ModelShape.of(cfg), device="meta")
    assert all(p.is_meta for p in meta.parameters())
    third = state(materialise(meta, "cpu", 7))
    other = state(cls(cfg, ModelShape.of(cfg), seed=8))
    for name in first:
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], third[name]), name
    random = [name for name in first if first[name].std() > 0]
    assert random and all(not torch.equal(first[name], other[name]) for name in random)


def test_the_dit_keeps_upstreams_distributions():
    """adaLN and output layers zero, norms one, embedding and Linear layers U(+-1/sqrt(fan_in))."""
    model = DiT(DiTConfig(d_model=256, n_layers=1, n_heads=4, cond_dim=64, vocab_size=512, seq_len=8),
                ModelShape(vocab_size=512, seq_len=8))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ("adaLN_modulation" in name or name == "output_layer.linear"):
            assert not module.weight.any() and not module.bias.any(), name
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            bound = 1 / math.sqrt(module.weight.shape[1])
            weight = module.weight
            assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound, name  # uniform to the bound
            assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound, name
            bias = getattr(module, "bias", None)
            assert bias is None or (bias.abs().max() <= bound and bias.std() > 0), name
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    assert len(norms) == 3 and all(torch.equal(p, torch.ones_like(p)) for p in norms)


def test_llada_keeps_its_distributions():
    model = LLaDA(LLaDAConfig(family="llada", d_model=128, n_layers=1, n_heads=4, mlp_hidden_size=256,
                              vocab_size=256, seq_len=8, init_std=0.03), ModelShape(vocab_size=256, seq_len=8))
    for name, p in model.named_parameters():
        if "norm" in name or name.startswith("ln_f"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.03) < 0.003 and abs(p.mean().item()) < 0.003, name


def test_row_blocks_do_not_change_what_a_slice_holds(monkeypatch):
    """A shard's rows are those of the whole tensor at the same positions, wherever the row blocks
    begin and end; a plain tensor and a column slice through a narrowed view agree too."""
    monkeypatch.setattr(keyed, "ROW_BLOCK_ELEMENTS", 12)  # blocks of 2 rows of 6
    whole = torch.empty(7, 6)
    fill_keyed(whole, "w", Init.normal(1.0), seed=3)
    assert keyed.rows_per_block((7, 6)) == 2
    again = torch.empty(7, 6)
    fill_keyed(again, "w", Init.normal(1.0), seed=3)
    assert torch.equal(whole, again)
    fill_keyed(again, "v", Init.normal(1.0), seed=3)
    assert not torch.equal(whole, again)  # another name, other values
    long_rows = torch.empty(3, 50)  # rows longer than a block: one row per block
    fill_keyed(long_rows, "w", Init.uniform(1.0), seed=3)
    assert keyed.rows_per_block((3, 50)) == 1 and long_rows.abs().max() <= 1.0 and long_rows.std() > 0


def test_an_unknown_parameter_kind_is_an_error_naming_it():
    model = DiT(DIT, ModelShape.of(DIT), device="meta")
    model.blocks["0"].extra = nn.Conv1d(2, 2, 1, device="meta")
    with pytest.raises(TypeError, match=r"blocks\.0\.extra\.weight"):
        materialise(model, "cpu", 0)
    keyed_init(nn.Linear(3, 2), 0, lambda *_: Init.constant(2.0))  # any rule the caller gives


@pytest.mark.parametrize("name, cfg", [("dit", DIT), ("llada", LLADA)])
def test_a_stage_is_built_with_only_its_own_parts(name, cfg):
    family, shape = get_family(name), ModelShape.of(cfg)
    stages = [family.build_stage(cfg, shape, stage, [1, 1, 1]) for stage in range(3)]
    assert all(p.is_meta for stage in stages for p in stage.parameters())
    assert sum(count_parameters(stage) for stage in stages) == count_parameters(family.build(cfg, shape, "meta"))
    assert [list(stage.blocks) for stage in stages] == [["0"], ["1"], ["2"]]
    whole = state(family.build(cfg, shape, seed=4))
    for stage in stages:
        for param_name, value in state(materialise(stage, "cpu", 4)).items():
            assert torch.equal(value, whole[param_name]), param_name


@pytest.mark.distributed
def test_meta_built_weights_are_identical_on_every_layout(tmp_path):
    """dp2 x tp2 (sharded and replicated), pp2 x tp2, pp2 x dp2 (also interleaved) and dp4 against
    one process, both families, blocks of one or two rows so block edges cut shards: the gathered
    weights are bit for bit the same, and a sharded rank holds about its share of them."""
    torchrun(4, WORKER, "same", str(tmp_path / "same.json"))
    results = json.loads((tmp_path / "same.json").read_text())
    assert len(results) == 2 * 6
    for r in results:
        assert r["names_match"] and r["differ"] == [], r
        sharded = 4 if "ddp" not in r["layout"] else 2  # ddp replicates over dp
        assert r["max_share"] <= 1.2 / sharded, r


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["dit", "llada"])
def test_building_at_dp2_takes_half_the_full_models_memory(family, tmp_path):
    """The peak resident memory a rank adds while building at dp=2 (measured: the kernel's
    high-water mark) is about half the full model's weights: the rank never holds the rest."""
    out = tmp_path / "memory.json"
    torchrun(2, "benchmarks/build_memory.py", "--worker", family, str(out), "parallel.dp=2")  # ~140 MB models
    measured = json.loads(out.read_text())
    full = measured["full_bytes"]
    assert full > 100 * 2**20
    for rank in measured["ranks"]:
        assert rank["shard_bytes"] <= 0.51 * full, rank
        assert 0.9 * rank["shard_bytes"] <= rank["peak_bytes"] <= 0.6 * full, rank  # it sees the shard, no more


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["checkpoint", "consolidated"])
def test_init_from_streams_into_the_shards(kind, tmp_path):
    """model.init_from at dp=2 from a checkpoint (DCP reads each rank's slices) or a consolidated
    file (one tensor at a time) of a ~140 MB model: the gathered weights are the source's, bit for
    bit, and the load adds far less than the full model to a rank's peak memory (reading the whole
    state first, as before, would add all of it)."""
    from safetensors.torch import save_file

    from benchmarks.build_memory import COMMON, SIZES, weight_digests
    from pretrain.checkpoint import Checkpointer
    from pretrain.config import load_config, to_dict

    cfg = load_config(None, [*COMMON, *SIZES["dit"]])
    model = DiT(cfg.model, ModelShape.of(cfg.model), seed=9)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    expected = weight_digests([model])
    if kind == "consolidated":
        source = tmp_path / "weights.safetensors"
        save_file(weights, str(source), metadata={"config": json.dumps(to_dict(cfg))})
    else:
        meta = {"config": to_dict(cfg), "has_ema": True, "ema_num_updates": 0, "tokens_seen": 0, "world_size": 1}
        source = Checkpointer(tmp_path / "run" / "checkpoints").save(0, {"model": weights, "ema": weights}, meta, {})
    del model, weights
    out = tmp_path / "memory.json"
    torchrun(2, "benchmarks/build_memory.py", "--worker", "dit", str(out), "parallel.dp=2", f"model.init_from={source}")
    measured = json.loads(out.read_text())
    for rank in measured["ranks"]:
        assert rank["loaded"] == expected, rank["rank"]
        assert rank["load_peak_bytes"] <= 0.3 * measured["full_bytes"], {k: v for k, v in rank.items() if k != "loaded"}
