"""FSDP2 (gptlab.training.fsdp) under torchrun, two CPU processes with gloo: the same losses and weights as
one plain process, sharded checkpoints that resume exactly (in as many processes or fewer) and hold no
pickle, activation checkpointing and bf16 mixed precision, and what a wrong checkpoint gets.

Each launch runs tests/training/fsdp_worker.py: a tiny GPTModel (tied head) trained 6 steps on fixed
random tokens, global batch 8 in micro-batches of 2, with the trainer's AdamW, schedule and clipping.
"""

import json
import subprocess
import sys
from pathlib import Path

import fsdp_worker
import pytest
import torch
from safetensors import safe_open

from gptlab.checkpoint import load_gptlab_checkpoint
from gptlab.training import fsdp

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fsdp_worker.py")


def launch(out: Path, *options: str, processes: int = 2) -> dict:
    """A torchrun of the worker with --fsdp; its losses.json (the model goes to out/model)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--standalone",
        str(WORKER),
        "--fsdp",
        "--steps",
        "6",
        "--out",
        str(out),
        *options,
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads((out / "losses.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load_gptlab_checkpoint(folder)  # the unsharded model each run saves, as gptlab.load_model reads it
    return model.state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    model, optimizer = fsdp_worker.new_model_and_optimizer(shard=False)
    plain = fsdp_worker.train_steps(model, optimizer, 0, 6)
    # "whole" also writes a sharded checkpoint after step 3, then fails to overwrite it.
    whole = launch(folder / "whole", "--save-after", "3", "--fail-a-save")
    halfway = str(folder / "whole" / "sharded")
    launches = {
        "resumed": launch(folder / "resumed", "--resume", halfway),
        "resharded": launch(folder / "resharded", "--resume", halfway, processes=1),
        "checkpointed": launch(folder / "checkpointed", "--activation-checkpointing"),
        "bf16": launch(folder / "bf16", "--mixed-precision", "bfloat16"),
    }
    yield {
        "folder": folder,
        "plain": plain,
        "plain_weights": model.state_dict(),
        "whole": whole["losses"],
        "failed_save_errors": whole["failed_save_errors"],
        **{name: result["losses"] for name, result in launches.items()},
    }


def test_two_fsdp_processes_train_as_one_plain_process(runs):
    assert len(runs["whole"]) == 6
    assert runs["whole"] == pytest.approx(runs["plain"], abs=1e-5)
    assert len(set(runs["plain"])) == 6  # each step's batch gives its own loss: the comparison has teeth
    fsdp_weights = weights(runs["folder"] / "whole" / "model")
    assert fsdp_weights.keys() == runs["plain_weights"].keys()
    for name, tensor in runs["plain_weights"].items():
        torch.testing.assert_close(fsdp_weights[name], tensor, atol=1e-5, rtol=0, msg=name)
    start = fsdp_worker.new_model_and_optimizer(shard=False)[0].state_dict()
    assert (fsdp_weights["tok_emb.weight"] - start["tok_emb.weight"]).abs().max() > 1e-3  # training moved them


def test_a_resumed_fsdp_run_is_bit_identical_to_an_uninterrupted_one(runs):
    assert runs["resumed"] == runs["whole"][3:]  # float equality
    whole, resumed = weights(runs["folder"] / "whole" / "model"), weights(runs["folder"] / "resumed" / "model")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_a_checkpoint_of_two_processes_resumes_in_one(runs):
    # DCP reassembles each tensor from the two ranks' slices; one process then sums its batch in another order.
    assert runs["resharded"] == pytest.approx(runs["whole"][3:], abs=1e-5)


def test_activation_checkpointing_gives_the_same_losses_and_weights(runs):
    assert runs["checkpointed"] == runs["whole"]
    whole = weights(runs["folder"] / "whole" / "model")
    checkpointed = weights(runs["folder"] / "checkpointed" / "model")
    assert all(torch.equal(whole[name], checkpointed[name]) for name in whole)


def test_bf16_mixed_precision_trains_close_to_fp32_and_keeps_fp32_weights(runs):
    assert runs["bf16"] == pytest.approx(runs["whole"], abs=2e-3)
    assert runs["bf16"] != runs["whole"]  # the matmuls did run in bf16
    assert all(t.dtype == torch.float32 for t in weights(runs["folder"] / "bf16" / "model").values())


def test_a_sharded_checkpoint_is_safetensors_and_json_with_each_rank_holding_its_rows(runs):
    folder = runs["folder"] / "whole" / "sharded"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        "sharded_state.json",
        "shards/shard-00001-model-00001-of-00001.safetensors",
        "shards/shard-00002-model-00001-of-00001.safetensors",
    ]  # nothing that unpickles
    assert json.loads((folder / "sharded_state.json").read_text()) == {"step": 3}
    rows = []
    for path in sorted((folder / "shards").iterdir()):
        with safe_open(str(path), "pt") as shard:
            layout = json.loads(shard.metadata()["DCP_SHARDING_INFO"])  # where each slice sits, as JSON
            names = set(shard.keys())
            moments = {"optimizer.tok_emb.weight.exp_avg", "optimizer.tok_emb.weight.exp_avg_sq"}
            assert {"model.tok_emb.weight", *moments} <= names
            assert "model.out_head.weight" not in names  # the tied head is stored once
            start = layout["model.tok_emb.weight"]["saved_offsets"][0]
            rows.append((start, start + shard.get_slice("model.tok_emb.weight").get_shape()[0]))
    assert rows == [(0, 33), (33, 65)]  # 65 token rows split between the two ranks, each written by its owner


def test_a_save_that_fails_on_one_rank_fails_on_all_and_keeps_the_previous_checkpoint(runs):
    folder = runs["folder"] / "whole"
    assert runs["failed_save_errors"] == [
        "OSError: disk full (simulated)",
        f"RuntimeError: another rank failed while saving the sharded checkpoint {folder / 'sharded'}; see its log",
    ]
    assert json.loads((folder / "sharded" / "sharded_state.json").read_text()) == {"step": 3}
    assert sorted(p.name for p in folder.iterdir()) == ["losses.json", "model", "sharded"]  # no temporary folder left


def test_loading_a_folder_that_is_not_a_sharded_checkpoint_says_what_it_needs(tmp_path):
    model, optimizer = fsdp_worker.new_model_and_optimizer(shard=False)
    (tmp_path / "sharded_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not a sharded checkpoint \(it needs shards/\*.safetensors"):
        fsdp.load_sharded(tmp_path, model, optimizer)


def test_a_checkpoint_of_another_model_is_refused_with_what_differs():
    here = {"model.tok_emb.weight": torch.zeros(65, 32), "model.trf_blocks.1.att.qkv.weight": torch.zeros(96, 32)}
    saved = {"model.tok_emb.weight": torch.Size([65, 64]), "model.final_norm.scale": torch.Size([64])}
    with pytest.raises(ValueError) as error:
        fsdp.check_layout(Path("runs/x/last"), saved, here)
    assert str(error.value) == (
        "runs/x/last holds another model: 1 tensors missing (first model.trf_blocks.1.att.qkv.weight); "
        "1 not in this model (first model.final_norm.scale); 1 of another shape (first model.tok_emb.weight: "
        "(65, 64) saved, (65, 32) here); resume with the model options of the run that wrote it"
    )
    fsdp.check_layout(Path("runs/x/last"), {name: t.shape for name, t in here.items()}, here)  # the same: no error


def test_an_unknown_mixed_precision_is_refused_before_sharding():
    model, _ = fsdp_worker.new_model_and_optimizer(shard=False)
    with pytest.raises(ValueError, match="mixed_precision must be one of bfloat16, float32 or None, got 'fp8'"):
        fsdp.shard_model(model, mixed_precision="fp8")
