"""Hostile assets: every unusable config.json, index, safetensors file, tensor or tokenizer file is one AssetError
line `<path>: <problem>`; non-finite weights raise (or warn with allow_non_finite=True); integer weights raise."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import load_file, save_file

from ponderttt.models import AssetError, load_hf_causal_lm, load_hf_config, load_hf_tokenizer, make_mesh

TOL = 1e-4
C_FC = "transformer.h.0.mlp.c_fc.weight"  # gpt2_tiny: Conv1D [n_embd 30, n_inner 46]


def raised(call, *args, **kwargs) -> str:
    """The message of the AssetError that `call(*args, **kwargs)` raises, checked to be one line."""
    with pytest.raises(AssetError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message == f"{info.value.path}: {info.value.problem}"
    return message


@pytest.fixture
def gpt2_dir(tmp_path, hf_data):
    """A writable copy of the gpt2_tiny checkpoint (config.json + model.safetensors)."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_data.dir("gpt2_tiny") / name, folder / name)
    return folder


def logits(model, ids):
    return np.asarray(model(ids).logits)


def test_asset_error_is_one_line_and_survives_pickling():
    error = AssetError("dir/config.json", "bad\n  thing")
    assert str(error) == "dir/config.json: bad thing" and isinstance(error, ValueError)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"  \n", "the file is empty"),
        (b'{"model_type": "gpt2", "n_embd": "\xff"}', "not UTF-8 text (byte 0xff at offset 34)"),
        (b'{"model_type": "gpt2",', "not valid JSON (Expecting property name enclosed in double quotes"),
        (b"[1, 2]", "holds a JSON array, not an object"),
        (b'"gpt2"', "holds a JSON string, not an object"),
        (b"{}", "no model_type; ponderttt.models reads 'gpt2', 'gemma3_text' and 'gemma3'"),
        (b'{"model_type": "llama"}', "model_type='llama' is not supported"),
        (b'{"model_type": "gpt2", "n_embd": "abc"}', "n_embd='abc' must be an integer"),
        (b'{"model_type": "gpt2", "n_layer": 2.5}', "n_layer=2.5 must be an integer"),
        (b'{"model_type": "gpt2", "n_head": true}', "n_head=True must be an integer"),
        (b'{"model_type": "gpt2", "n_layer": -2}', "GPT2Config: n_layer=-2 must be positive"),
        (b'{"model_type": "gpt2", "n_head": 0}', "GPT2Config: n_head=0 must be positive"),
        (b'{"model_type": "gpt2", "layer_norm_epsilon": NaN}', "layer_norm_epsilon=nan must be a finite number"),
        (b'{"model_type": "gpt2", "tie_word_embeddings": "yes"}', "tie_word_embeddings='yes' must be true or false"),
        (b'{"model_type": "gemma3_text", "num_key_value_heads": 0}', "Gemma3Config: num_kv_heads=0 must be positive"),
        (b'{"model_type": "gemma3_text", "layer_types": [1]}', "layer_types=[1] must be an array of strings"),
        (b'{"model_type": "gemma3_text", "final_logit_softcapping": 0}', "final_logit_softcapping=0.0 must be"),
        (b'{"model_type": "gemma3_text", "rope_parameters": 3}', "rope_parameters=3 must be an object or null"),
        (
            b'{"model_type": "gemma3_text", "rope_scaling": {"rope_type": "linear"}}',
            "global rope_type='linear' needs a factor",
        ),
        (b'{"model_type": "gemma3", "text_config": []}', "text_config=[] must be an object or null"),
    ],
)
def test_a_bad_config_json_is_one_line_naming_the_file(gpt2_dir, content, problem):
    (gpt2_dir / "config.json").write_bytes(content)
    message = raised(load_hf_causal_lm, gpt2_dir)
    assert message.startswith(f"{gpt2_dir / 'config.json'}: ") and problem in message
    assert raised(load_hf_config, gpt2_dir) == message


def _split_into_shards(folder) -> dict[str, str]:
    """Rewrites `folder`'s model.safetensors as two shards with an index; returns the weight map."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ("", "the file is empty"),
        ('{"weight_map": ', "not valid JSON"),
        ("[]", "holds a JSON array, not an object"),
        ('{"metadata": {}}', "has no 'weight_map'"),
        ('{"weight_map": ["model-00001-of-00002.safetensors"]}', "'weight_map' must be a non-empty object"),
        ('{"weight_map": {}}', "'weight_map' must be a non-empty object"),
        ('{"weight_map": {"wte": 3}}', "weight_map['wte'] = 3 is not the name of a file in its directory"),
        ('{"weight_map": {"wte": "../model.safetensors"}}', "weight_map['wte'] = '../model.safetensors' is not"),
        ('{"weight_map": {"wte": "gone.safetensors"}}', "weight_map names shard 'gone.safetensors', which is not in"),
    ],
)
def test_a_bad_safetensors_index_is_one_line_naming_the_index(gpt2_dir, index, problem):
    _split_into_shards(gpt2_dir)
    (gpt2_dir / "model.safetensors.index.json").write_text(index)
    message = raised(load_hf_causal_lm, gpt2_dir)
    assert message.startswith(f"{gpt2_dir / 'model.safetensors.index.json'}: ") and problem in message


def test_a_shard_the_index_names_that_is_missing(gpt2_dir, hf_data):
    _split_into_shards(gpt2_dir)
    g = hf_data.golden("gpt2_tiny")
    np.testing.assert_allclose(logits(load_hf_causal_lm(gpt2_dir), g["input_ids"]), g["logits"], atol=TOL, rtol=0)
    (gpt2_dir / "model-00002-of-00002.safetensors").unlink()
    message = raised(load_hf_causal_lm, gpt2_dir)
    assert message == (
        f"{gpt2_dir / 'model.safetensors.index.json'}: weight_map names shard 'model-00002-of-00002.safetensors', "
        f"which is not in {gpt2_dir}"
    )


@pytest.mark.parametrize(
    ("cut", "problem"),
    [
        (lambda data: data[:-7], "incomplete metadata, file not fully covered"),
        (lambda data: data[:5], "header"),
        (lambda data: b"not a safetensors file at all", "header too large"),
    ],
)
def test_a_truncated_or_foreign_safetensors_file_names_the_file(gpt2_dir, cut, problem):
    file = gpt2_dir / "model.safetensors"
    file.write_bytes(cut(file.read_bytes()))
    message = raised(load_hf_causal_lm, gpt2_dir)
    assert message.startswith(f"{file}: not a readable .safetensors file (") and problem in message


def test_missing_and_mis_shaped_tensors_name_the_tensor_and_both_shapes(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    del tensors["transformer.h.0.ln_1.weight"]
    tensors["transformer.h.1.mlp.c_fc.weight"] = np.zeros((30, 45), np.float32)
    save_file(tensors, gpt2_dir / "model.safetensors")
    message = raised(load_hf_causal_lm, gpt2_dir)
    assert message.startswith(f"{gpt2_dir}: cannot load as GPT2Config (prefix 'transformer.'): 2 problem(s): ")
    assert "missing tensor 'transformer.h.0.ln_1.weight' for parameter blocks.0.ln_1.scale (30,)" in message
    assert "'transformer.h.1.mlp.c_fc.weight' is (30, 45), parameter blocks.1.mlp.c_fc.kernel needs (30, 46)" in message


def test_a_long_list_of_problems_is_cut_to_twenty_and_counted(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    (gpt2_dir / "config.json").write_text(json.dumps({**config, "n_layer": 5}))  # the checkpoint has 2 blocks
    message = raised(load_hf_causal_lm, gpt2_dir)
    total = int(re.search(r": (\d+) problem\(s\): ", message).group(1))
    assert total == 3 * 16  # per missing block, 8 modules with a weight and a bias: ln_1, q, k, v, c_proj, ln_2,
    # c_fc, mlp c_proj
    assert message.count("missing tensor") == 20 and message.endswith(f"; and {total - 20} more")


@pytest.mark.parametrize(("dtype", "name"), [(np.int8, "I8"), (np.bool_, "BOOL"), (np.uint8, "U8")])
def test_integer_weights_are_refused_as_quantised(gpt2_dir, dtype, name):
    tensors = load_file(gpt2_dir / "model.safetensors")
    tensors[C_FC] = np.ones(tensors[C_FC].shape, dtype)
    tensors["transformer.h.1.mlp.c_fc.weight"] = np.ones((30, 46), dtype)
    save_file(tensors, gpt2_dir / "model.safetensors")
    message = raised(load_hf_causal_lm, gpt2_dir)
    assert "1 problem(s): 2 tensor(s) hold integers or booleans where the model needs floating-point weights" in message
    assert f"('{C_FC}' is {name}, 'transformer.h.1.mlp.c_fc.weight' is {name})" in message
    assert "quantised checkpoints are not supported" in message


def _with_non_finite(folder, dtype=np.float32) -> np.ndarray:
    """Stores every tensor as `dtype`, with NaN, +Inf and -Inf in c_fc of block 0; returns that tensor."""
    tensors = {k: v.astype(dtype) for k, v in load_file(folder / "model.safetensors").items()}
    tensors[C_FC][0, :2] = np.nan
    tensors[C_FC][1, 0] = np.inf
    tensors[C_FC][2, 5] = -np.inf
    save_file(tensors, folder / "model.safetensors")
    return tensors[C_FC]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_non_finite_weights_raise_naming_the_tensor_and_the_count(gpt2_dir, dtype):
    _with_non_finite(gpt2_dir, dtype)
    message = raised(load_hf_causal_lm, gpt2_dir, dtype=dtype)
    assert message == (
        f"{gpt2_dir / 'model.safetensors'}: tensor '{C_FC}' has 4 non-finite (NaN or Inf) values of 1380 read as "
        f"{np.dtype(dtype).name}; pass allow_non_finite=True to load it anyway"
    )


def test_non_finite_weights_are_checked_on_the_sharded_path_too(gpt2_dir):
    _with_non_finite(gpt2_dir)
    message = raised(load_hf_causal_lm, gpt2_dir, mesh=make_mesh(data=1, fsdp=1, tensor=1))
    assert f"tensor '{C_FC}' has 4 non-finite (NaN or Inf) values of 1380 read" in message


def test_allow_non_finite_warns_and_loads_the_values_as_stored(gpt2_dir, caplog):
    stored = _with_non_finite(gpt2_dir)
    with caplog.at_level(logging.WARNING, logger="ponderttt.models.hf"):
        model = load_hf_causal_lm(gpt2_dir, allow_non_finite=True)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"{gpt2_dir / 'model.safetensors'}: tensor '{C_FC}' has 4 non-finite (NaN or Inf) values of 1380 read as "
        "float32; loaded anyway (allow_non_finite=True)"
    )
    np.testing.assert_array_equal(np.asarray(model.blocks[0].mlp.c_fc.kernel[...]), stored)


def test_values_that_overflow_the_load_dtype_are_non_finite_too(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    tensors[C_FC][0, 0] = 1e5  # finite in float32, beyond float16's 65504
    save_file(tensors, gpt2_dir / "model.safetensors")
    assert load_hf_causal_lm(gpt2_dir) is not None
    message = raised(load_hf_causal_lm, gpt2_dir, dtype=jnp.float16)
    assert f"tensor '{C_FC}' has 1 non-finite (NaN or Inf) values of 1380 read as float16" in message


def test_a_good_directory_loads_as_before_and_warns_nothing(gpt2_dir, hf_data, caplog):
    g = hf_data.golden("gpt2_tiny")
    with caplog.at_level(logging.WARNING):
        model = load_hf_causal_lm(gpt2_dir, allow_non_finite=True)
    assert caplog.records == []
    np.testing.assert_allclose(logits(model, g["input_ids"]), g["logits"], atol=TOL, rtol=0)


@pytest.fixture
def tokenizer_dir(tmp_path):
    vocab = {"<unk>": 0, "<eos>": 1, "def": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "EOF while parsing a value"),
        (b"\xff\xfe", "stream did not contain valid UTF-8"),
        (b"{", "EOF while parsing an object"),
        (b"[]", "invalid type: sequence, expected struct Tokenizer"),
    ],
)
def test_a_bad_tokenizer_json_wraps_the_library_error_with_the_path(tokenizer_dir, content, problem):
    (tokenizer_dir / "tokenizer.json").write_bytes(content)
    message = raised(load_hf_tokenizer, tokenizer_dir)
    assert message.startswith(f"{tokenizer_dir / 'tokenizer.json'}: not a tokenizer.json that the tokenizers library ")
    assert problem in message


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "the file is empty"),
        ('{"eos_token": ', "not valid JSON"),
        ('["<eos>"]', "holds a JSON array, not an object"),
        ('{"eos_token": 5}', "eos_token=5 is neither a token string nor an object with a string 'content'"),
        ('{"bos_token": {"content": ["<eos>"]}}', "bos_token={'content': ['<eos>']} is neither a token string"),
    ],
)
def test_a_bad_special_tokens_file_is_one_line_naming_it(tokenizer_dir, name, content, problem):
    assert load_hf_tokenizer(tokenizer_dir).eos_token_id is None
    (tokenizer_dir / name).write_text(content)
    message = raised(load_hf_tokenizer, tokenizer_dir)
    assert message.startswith(f"{tokenizer_dir / name}: ") and problem in message
    (tokenizer_dir / name).write_text('{"eos_token": {"content": "<eos>"}, "pad_token": null}')
    tok = load_hf_tokenizer(tokenizer_dir)
    assert (tok.eos_token_id, tok.pad_token_id, tok.encode("def")) == (1, None, [2])
