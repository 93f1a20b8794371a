"""Fine-tuning runs end to end: LoRA in `train --init` and `finetune` changes nothing but the adapters (also
on a bfloat16 or int8 base), its adapter merges and exports to PEFT, an interrupted fine-tune resumes
exactly, torchrun trains like one process, and bad input ends in one line, exit code 2, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER, random_model, read_jsonl, tiny_config, write_jsonl
from safetensors.torch import load_file
from test_train import press_ctrl_c_after, train_losses, validation_losses

from gptlab import load_model
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.finetune.lora import AdapterDropout, read_adapter
from gptlab.finetune.pipeline import finetune
from gptlab.tokenizer import CharTokenizer

RUN = [
    "--batch-size",
    "4",
    "--eval-interval",
    "2",
    "--log-interval",
    "1",
    "--sample-tokens",
    "8",
    "--lr",
    "1e-2",
    "--warmup-steps",
    "1",
    "--device",
    "cpu",
    "--no-progress",
]
RECORDS = [{"instruction": f"Sort: {a} {b}", "output": f"{min(a, b)} {max(a, b)}"} for a in "abcd" for b in "efgh"]


def gptlab(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def instructions(tmp_path):
    return str(write_jsonl(tmp_path / "sort.jsonl", RECORDS))


def lora_merged_weights(base: dict, adapter_folder) -> dict:
    """The explicit formula: W + alpha / rank · B·A for every adapted weight, the base's tensor elsewhere."""
    adapter = read_adapter(adapter_folder)
    scale = adapter.config.alpha / adapter.config.rank
    merged = dict(base)
    for name, a in adapter.tensors.items():
        if name.endswith(".lora_A"):
            module = name.removesuffix(".lora_A")
            merged[f"{module}.weight"] = base[f"{module}.weight"] + scale * adapter.tensors[f"{module}.lora_B"] @ a
    return merged


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_lora_run_changes_only_the_adapters(tiny_base, instructions, tmp_path, capsys, command):
    if command == "train":  # the records' lines as plain text, in windows of 16 characters
        text = tmp_path / "sort.txt"
        text.write_text(Path(instructions).read_text())
        data = ["--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--context-length", "16"]
    else:
        data = ["--data", instructions]
    argv = [
        *(["finetune", "instruct"] if command == "finetune" else ["train"]),
        "--init",
        str(tiny_base),
        *data,
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--lora-targets",
        "qkv",
        "proj",
        "head",
        *RUN,
    ]
    code, out, err = gptlab(capsys, argv)
    assert code == 0, err
    resume = [
        *argv[: 2 if command == "finetune" else 1],
        "--out",
        str(tmp_path / "run"),
        "--resume",
        "--max-steps",
        "4",
    ]
    assert gptlab(capsys, resume)[0] == 0  # the frozen base comes from --init again
    assert list(train_losses(tmp_path / "run")) == [1, 2, 3, 4]
    checkpoint = tmp_path / "run/last"
    cfg = load_model(checkpoint)[0].cfg
    base_total = sum(t.numel() for t in load_file(str(checkpoint / "model.safetensors")).values())
    # A is (rank, in) and B (out, rank): qkv 16 → 48 and proj 64 → 16 in each block, the head 16 → vocabulary.
    trainable = cfg.n_layers * 4 * ((16 + 48) + (64 + 16)) + 4 * (16 + cfg.vocab_size)
    assert (
        f"LoRA rank 4, alpha 8 on qkv, proj, head, base in float32; trainable parameters: {trainable:,} of "
        f"{base_total + trainable:,} ({100 * trainable / (base_total + trainable):.2f}%)"
    ) in out
    adapter = read_adapter(checkpoint)
    assert adapter.base == str(tiny_base) and set(adapter.tensors) == {
        f"{module}.lora_{part}"
        for module in (
            "trf_blocks.0.att.qkv",
            "trf_blocks.0.ff.proj",
            "trf_blocks.1.att.qkv",
            "trf_blocks.1.ff.proj",
            "out_head",
        )
        for part in "AB"
    }
    assert all(adapter.tensors[name].abs().sum() > 0 for name in adapter.tensors if name.endswith("lora_B"))
    base = load_file(str(tiny_base / "model.safetensors"))
    base["pos_emb.weight"] = base["pos_emb.weight"][: cfg.context_length]  # `train` cropped it to --context-length
    tuned = load_file(str(checkpoint / "model.safetensors"))
    expected = lora_merged_weights(base, checkpoint)
    assert tuned.keys() == expected.keys()
    adapted = {f"{name.removesuffix('.lora_A')}.weight" for name in adapter.tensors if name.endswith(".lora_A")}
    assert len(adapted) == 5
    for name in base:
        if name in adapted:
            torch.testing.assert_close(tuned[name], expected[name], atol=1e-6, rtol=0)
        else:
            assert torch.equal(tuned[name], base[name]), name  # frozen: bit for bit the base's

    # the adapter on its own: merge-lora folds it into the base as the run did
    code, out, _ = gptlab(capsys, ["merge-lora", "--adapter", str(checkpoint), "--out", str(tmp_path / "merged")])
    assert code == 0 and f"wrote {tmp_path / 'merged'}, a new checkpoint: {tiny_base} with the adapter" in out
    assert f"{tiny_base} is unchanged" in out
    template = json.loads((checkpoint / "config.json").read_text()).get("chat_template")
    assert template == ("alpaca" if command == "finetune" else None)  # an instruction run's template...
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("chat_template") == template  # ...kept
    merged, _ = load_model(tmp_path / "merged")
    run_model, _ = load_model(checkpoint)
    ids = torch.tensor([TOKENIZER.encode("Sort: a e")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), run_model(ids), atol=1e-5, rtol=0)


def test_the_adapter_of_a_run_exports_for_peft_with_the_runs_logits(tiny_base, instructions, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    argv = [
        "finetune",
        "instruct",
        "--init",
        str(tiny_base),
        "--data",
        instructions,
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--lora-rank",
        "4",
        *RUN,
    ]
    assert gptlab(capsys, argv)[0] == 0
    assert gptlab(capsys, ["convert", "--to-hf", str(tiny_base), str(tmp_path / "hf")])[0] == 0
    code, out, err = gptlab(
        capsys, ["convert", "--to-hf", "--adapter", str(tmp_path / "run/last"), str(tmp_path / "peft")]
    )
    assert code == 0, err
    hf = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf"), tmp_path / "peft"
    )
    run_model, _ = load_model(tmp_path / "run/last")
    ids = torch.tensor([TOKENIZER.encode("Sort: a e")])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, run_model(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_a_lora_run_on_a_low_precision_base_trains_float32_adapters(
    tiny_base, instructions, tmp_path, capsys, base_dtype
):
    argv = [
        "finetune",
        "instruct",
        "--init",
        str(tiny_base),
        "--data",
        instructions,
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "4",
        "--lora-rank",
        "4",
        "--lora-base-dtype",
        base_dtype,
        *RUN,
        *(["--dtype", "bfloat16"] if base_dtype == "bfloat16" else []),  # auto is float32 on a CPU without it
    ]
    code, out, err = gptlab(capsys, argv)
    assert code == 0, err
    losses = list(train_losses(tmp_path / "run").values())
    assert losses[-1] < losses[0]
    adapter = read_adapter(tmp_path / "run/last")
    assert all(t.dtype == torch.float32 for t in adapter.tensors.values())
    tuned = load_file(str(tmp_path / "run/last/model.safetensors"))
    # The merged model (float32) folds the adapters into the base as the run kept it: every frozen tensor
    # rounded to bfloat16, or every Linear weight rounded to int8 rows, q = round(W / s) with s = max|W| / 127.
    base = load_file(str(tiny_base / "model.safetensors"))
    for name, tensor in base.items():
        if base_dtype == "bfloat16":
            base[name] = tensor.to(torch.bfloat16).float()
        elif name.endswith("weight") and name.startswith(("trf_blocks.", "out_head")) and tensor.dim() == 2:
            scale = tensor.abs().amax(dim=1, keepdim=True) / 127
            base[name] = torch.round(tensor / scale) * scale
    assert all(t.dtype == torch.float32 for t in tuned.values()) and tuned.keys() == base.keys()
    expected = lora_merged_weights(base, tmp_path / "run/last")
    for name in base:
        torch.testing.assert_close(tuned[name], expected[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("task", ["instruct", "classify"])
def test_an_interrupted_finetune_resumes_exactly(tiny_base, tmp_path, monkeypatch, capsys, task):
    if task == "instruct":
        data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
        extra = ["--lora-rank", "4", "--lora-dropout", "0.1"]  # dropout: the random state must resume too
    else:
        data = write_jsonl(
            tmp_path / "data.jsonl", [{"text": r["instruction"], "label": r["output"][0]} for r in RECORDS]
        )
        extra = ["--drop-rate", "0.1"]
    argv = ["finetune", task, "--init", str(tiny_base), "--data", str(data), "--max-steps", "6", *extra, *RUN]
    assert gptlab(capsys, [*argv, "--out", str(tmp_path / "whole")])[0] == 0
    press_ctrl_c_after(monkeypatch, step=4)  # at an evaluation: both runs evaluate at the same steps
    code, out, _ = gptlab(capsys, [*argv, "--out", str(tmp_path / "parts")])
    assert code == 0 and "stopped by Ctrl-C at step 4" in out
    monkeypatch.undo()
    for log in ["metrics.jsonl"] + ["samples.jsonl"] * (task == "instruct"):  # as if it crashed mid-write
        with open(tmp_path / "parts" / log, "a") as file:
            file.write('{"step": 5, "trai')
    code, out, err = gptlab(capsys, ["finetune", task, "--out", str(tmp_path / "parts"), "--resume", "--no-progress"])
    assert code == 0, err
    assert f"{tmp_path / 'parts' / 'metrics.jsonl'}: dropped its last line, cut short by the crash" in out
    whole, parts = train_losses(tmp_path / "whole"), train_losses(tmp_path / "parts")
    assert list(parts) == [1, 2, 3, 4, 5, 6] and list(parts.values()) == list(whole.values())
    assert validation_losses(tmp_path / "parts") == validation_losses(tmp_path / "whole")
    for name in ["model.safetensors", "optimizer.safetensors"] + ["adapter.safetensors"] * (task == "instruct"):
        whole_tensors, parts_tensors = (load_file(str(tmp_path / run / "last" / name)) for run in ("whole", "parts"))
        assert all(torch.equal(whole_tensors[key], parts_tensors[key]) for key in whole_tensors), name
    if task == "instruct":
        assert read_jsonl(tmp_path / "parts/samples.jsonl") == read_jsonl(tmp_path / "whole/samples.jsonl")
    code, _, err = gptlab(capsys, ["finetune", task, "--out", str(tmp_path / "parts"), "--resume", "--data", "x.jsonl"])
    assert code == 2 and err.count("\n") == 1 and f"--data is 'x.jsonl' here and '{data}' in the run" in err


@pytest.mark.slow
def test_two_processes_finetune_like_one(tiny_base, instructions, tmp_path, capsys):
    argv = [
        "finetune",
        "instruct",
        "--init",
        str(tiny_base),
        "--data",
        instructions,
        "--max-steps",
        "4",
        "--micro-batch-size",
        "1",
        "--dtype",
        "float32",
        *RUN,
    ]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "gptlab",
            *argv,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert gptlab(capsys, [*argv, "--out", str(tmp_path / "one")])[0] == 0
    one, other = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert list(other) == [1, 2, 3, 4]
    assert list(other.values()) == pytest.approx(list(one.values()), abs=1e-5)
    assert [v for _, v in validation_losses(tmp_path / "two")] == pytest.approx(
        [v for _, v in validation_losses(tmp_path / "one")], abs=1e-5
    )
    assert two.stdout.count("stopped by max_steps after 4 steps") == 1


# ---------------------------------------------------------------------------------------- bad input


def refused(capsys, tmp_path, argv: list[str], message: str) -> None:
    code, _, err = gptlab(capsys, argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '],
            "bad.jsonl: line 2 is not valid JSON",
        ),
        (
            ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a"}'],
            "bad.jsonl: line 3 has no 'output' field",
        ),
        (['{"instruction": "a", "output": 3}'], "bad.jsonl: line 1: 'output' is a JSON int; it must be a string"),
        (['["a", "b"]'], "bad.jsonl: line 1 is a JSON list, not an object"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "bad.jsonl: line 1: messages[0] has role 'robot'"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], "bad.jsonl: line 1: the last message is the user's"),
        (
            ['{"instruction": "\u00e9", "output": "b"}', '{"instruction": "a", "output": "b"}'],
            "bad.jsonl: line 1: character '\u00e9' is not in this character-level vocabulary",
        ),
    ],
)
def test_malformed_instruction_records_are_refused_naming_the_record(tiny_base, tmp_path, capsys, lines, message):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    refused(
        capsys,
        tmp_path,
        [
            "finetune",
            "instruct",
            "--init",
            str(tiny_base),
            "--data",
            str(tmp_path / "bad.jsonl"),
            "--out",
            str(tmp_path / "out"),
            *RUN,
        ],
        message,
    )


@pytest.mark.parametrize(
    "train_rows, extra, message",
    [
        ("text,label\na,x\nb,x\nc,x\nd,x\n", [], "has only the label 'x'; a classifier needs at least two classes"),
        ("text,label\n", [], "bad.csv holds no records; give at least one"),
        ("text,label\na,x\nb,\n", [], "bad.csv: line 3: the label is empty"),
        ("text,label\na,x\nb,y,z\n", [], "bad.csv: line 3 has 3 fields but the header has 2"),
        ("text,kind\na,x\n", [], "bad.csv: line 2 has no 'label' field (it has: kind, text)"),
        (
            "text,label\na,x\nb,y\nc,x\nd,y\n",
            ["--test-data", "TEST"],
            "test.csv: line 3: label 'z' is only in the test split",
        ),
    ],
)
def test_bad_classification_data_is_refused(tiny_base, tmp_path, capsys, train_rows, extra, message):
    (tmp_path / "bad.csv").write_text(train_rows)
    (tmp_path / "val.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "test.csv").write_text("text,label\na,x\nb,z\n")
    extra = [str(tmp_path / "test.csv") if item == "TEST" else item for item in extra]
    refused(
        capsys,
        tmp_path,
        [
            "finetune",
            "classify",
            "--init",
            str(tiny_base),
            "--data",
            str(tmp_path / "bad.csv"),
            "--val-data",
            str(tmp_path / "val.csv"),
            "--out",
            str(tmp_path / "out"),
            *extra,
            *RUN,
        ],
        message,
    )


def test_an_adapter_is_refused_by_a_base_of_another_vocabulary_or_shape(tiny_base, instructions, tmp_path, capsys):
    argv = [
        "finetune",
        "instruct",
        "--init",
        str(tiny_base),
        "--data",
        instructions,
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--lora-rank",
        "2",
        *RUN,
    ]
    assert gptlab(capsys, argv)[0] == 0
    for name, cfg, tokenizer in [
        ("vocab", tiny_config(vocab_size=30), CharTokenizer("abcdefghijklmnopqrstuvwxyz .,")),
        ("shape", tiny_config(emb_dim=32), TOKENIZER),
    ]:
        save_model(tmp_path / name, random_model(cfg), tokenizer)
        field = "vocab_size" if name == "vocab" else "emb_dim"
        refused(
            capsys,
            tmp_path,
            [
                "merge-lora",
                "--adapter",
                str(tmp_path / "run/last"),
                "--base",
                str(tmp_path / name),
                "--out",
                str(tmp_path / "out"),
            ],
            f"the adapter was made for a base with {field}",
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--lora-rank", "4"],
            "LoRA adapts a trained model and keeps its weights frozen; add --init CHECKPOINT",
        ),
        (["train", "--init", "BASE", "--lora-alpha", "8"], "--lora-alpha sets up LoRA adapters; add --lora-rank"),
        (["train", "--init", "BASE", "--lora-rank", "0"], "LoRA rank must be a positive integer, got 0"),
        (
            [
                "finetune",
                "instruct",
                "--init",
                "BASE",
                "--data",
                "DATA",
                "--lora-rank",
                "4",
                "--lora-base-dtype",
                "bfloat16",
                "--dtype",
                "float32",
            ],
            "--lora-base-dtype bfloat16 computes in bfloat16, and this run trains in float32",
        ),
        (["finetune", "instruct", "--data", "DATA"], "fine-tuning starts from a trained model: add --init CHECKPOINT"),
        (["finetune", "instruct", "--init", "BASE"], "give the training data: --data FILE"),
        (
            ["finetune", "classify", "--init", "BASE", "--data", "DATA", "--train-blocks", "9"],
            "--train-blocks must be 'all' or a number of final blocks from 1 to 2, got '9'",
        ),
    ],
)
def test_impossible_settings_are_refused(tiny_base, instructions, tmp_path, capsys, argv, message):
    argv = [{"BASE": str(tiny_base), "DATA": instructions}.get(item, item) for item in argv]
    refused(capsys, tmp_path, [*argv, "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"], message)


def test_the_dropout_schedule_leaves_the_adapters_dropout_at_its_setting(tiny_base, instructions, tmp_path):
    """The model's dropout is off for the first steps and doubled after them; every training call of an
    adapter's dropout runs at --lora-dropout and drops that share of its input, and the saved adapter says so."""
    seen = {"adapter": [], "model": set()}

    def record(module, inputs, output):
        if not (module.training and isinstance(module, torch.nn.Dropout)):
            return
        if isinstance(module, AdapterDropout):
            seen["adapter"].append((module.p, (output == 0).sum().item(), output.numel()))
        else:
            seen["model"].add(round(module.p, 6))

    lines = []
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        finetune(
            "instruct",
            init=str(tiny_base),
            data=instructions,
            out=str(tmp_path / "run"),
            max_steps=8,
            batch_size=4,
            lr=1e-2,
            warmup_steps=1,
            eval_interval=100,
            sample_tokens=0,
            progress=False,
            device="cpu",
            lora_rank=4,
            lora_dropout=0.25,
            drop_rate=0.1,
            dropout_from_epoch=0.5,
            dropout_double_for_epochs=0.5,
            log=lines.append,
        )
    finally:
        handle.remove()
    assert any("dropout on at 0.2 (twice the model's" in line for line in lines), lines
    assert seen["model"] == {0.0, 0.2}  # the schedule ran: off, then doubled
    assert {p for p, _, _ in seen["adapter"]} == {0.25}
    dropped, values = (sum(column) for column in list(zip(*seen["adapter"]))[1:])
    assert values > 20_000 and dropped / values == pytest.approx(0.25, abs=0.01)
    assert read_adapter(tmp_path / "run/last").config.dropout == 0.25
    assert main(["convert", "--to-hf", "--adapter", str(tmp_path / "run/last"), str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft/adapter_config.json").read_text())["lora_dropout"] == 0.25


def test_a_classifier_run_writes_a_report_card_of_its_own_figures(tiny_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": r["instruction"], "label": r["output"][0]} for r in RECORDS])
    run = tmp_path / "letters"
    argv = [
        "finetune",
        "classify",
        "--init",
        str(tiny_base),
        "--data",
        str(data),
        "--max-steps",
        "4",
        "--out",
        str(run),
    ]
    code, out, err = gptlab(capsys, [*argv, *RUN])
    assert code == 0, err
    assert f"report: {run / 'report.md'}" in out
    card = (run / "report.md").read_text()
    evaluations = [record for record in read_jsonl(run / "metrics.jsonl") if "val_loss" in record]
    assert f"| data | finetune classify of {tiny_base} on {data} |" in card
    assert "| step | tokens | loss | accuracy |" in card
    for record in evaluations:
        assert (
            f"| {record['step']} | {record['tokens']:,} | {record['val_loss']:.4f} | {record['val_accuracy']:.4f} |"
            in card
        )
