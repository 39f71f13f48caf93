"""Hugging Face peft adapters in and out of keras-hub models.

The fixtures in tests/fixtures/hf/ (written by make_hf_fixtures.py with torch,
transformers and peft) hold tiny transformers checkpoints, peft adapters on
them and peft's logits. Loading an adapter into the keras-hub model of the
same checkpoint must give peft's logits, unmerged and merged; saving must give
an adapter that loads back to the same factors and logits. These tests need
neither torch nor peft. The live tests at the end (skipped without torch,
transformers and peft) load what `save_peft_adapter` wrote with stock peft.

Tolerance: logits of magnitude up to about 10 from float32 arithmetic in two
frameworks, `atol=1e-4` as the issue states; measured differences are below
2.1e-5.
"""

import json
import pathlib
import re
import shutil
import warnings

import keras
import numpy as np
import pytest
import safetensors.numpy

import keras_lora
from keras_lora.layers.base import LoraLayer
from keras_lora.tree.walk import walk

keras_hub = pytest.importorskip("keras_hub")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ("llama", "gemma", "qwen2", "gpt2", "mistral")
ADAPTERS = ("qv", "all_linear", "dora")
TASKS = {
    "llama": "Llama3CausalLM",
    "gemma": "GemmaCausalLM",
    "qwen2": "QwenCausalLM",
    "gpt2": "GPT2CausalLM",
    "mistral": "MistralCausalLM",
}
ATOL = 1e-4


def causal_lm(family: str) -> keras.Model:
    """The keras-hub causal LM of a fixture checkpoint, without preprocessor."""
    backbone = keras_hub.models.Backbone.from_preset(str(FIXTURES / family / "model"))
    return getattr(keras_hub.models, TASKS[family])(
        backbone=backbone, preprocessor=None
    )


def reference(family: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / family / "logits.npz") as arrays:
        return dict(arrays)


def logits(model, ref) -> np.ndarray:
    inputs = {"token_ids": ref["token_ids"], "padding_mask": ref["padding_mask"]}
    return keras.ops.convert_to_numpy(model(inputs))


def lora_paths(model) -> list[str]:
    return [p for p, s in walk(model).items() if isinstance(s.layer, LoraLayer)]


def copy_adapter(family, adapter, tmp_path) -> pathlib.Path:
    target = tmp_path / f"{family}-{adapter}"
    shutil.copytree(FIXTURES / family / adapter, target)
    return target


def edit_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def randomize_adapters(model, seed=0) -> None:
    """Non-zero factors, and magnitudes off the weight norm, on every adapter."""
    rng = np.random.default_rng(seed)
    for site in walk(model).values():
        if not isinstance(site.layer, LoraLayer):
            continue
        for adapter in site.layer.adapters.values():
            for name, variable in adapter.parameters.items():
                if name == "lora_magnitude_vector":
                    factor = rng.uniform(0.5, 1.5, variable.shape)
                    value = keras.ops.convert_to_numpy(variable) * factor
                else:
                    value = rng.normal(0.0, 0.3, variable.shape)
                variable.assign(value.astype("float32"))


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_load_gives_peft_logits_unmerged_and_merged(family, adapter):
    ref = reference(family)
    model = causal_lm(family)
    np.testing.assert_allclose(logits(model, ref), ref["base"], atol=ATOL)

    lora_model = keras_lora.load_peft_adapter(model, FIXTURES / family / adapter)

    assert lora_model is model
    np.testing.assert_allclose(logits(lora_model, ref), ref[adapter], atol=ATOL)
    keras_lora.merge(lora_model)
    np.testing.assert_allclose(
        logits(lora_model, ref), ref[f"{adapter}_merged"], atol=ATOL
    )
    # The adapter matters: peft's adapted logits are far from the base.
    assert np.abs(ref[adapter] - ref["base"]).max() > 0.1


def test_load_reads_settings_and_patterns_from_the_config():
    model = keras_lora.load_peft_adapter(
        causal_lm("llama"), FIXTURES / "llama" / "all_linear"
    )
    config = json.loads(
        (FIXTURES / "llama" / "all_linear" / "adapter_config.json").read_text()
    )
    layers = {
        p: s.layer for p, s in walk(model).items() if isinstance(s.layer, LoraLayer)
    }

    assert len(layers) == 2 * 7  # every Linear of both decoder layers
    adapters = [layer.adapters["default"] for layer in layers.values()]
    assert {a.rank for a in adapters} == {config["r"], *config["rank_pattern"].values()}
    assert {a.alpha for a in adapters} == {
        config["lora_alpha"],
        *config["alpha_pattern"].values(),
    }
    assert keras_lora.adapter_config(model).adapter_name == "default"


def test_load_reads_all_linear_and_module_names_of_the_base_model(tmp_path):
    # peft 0.21 saves the modules "all-linear" resolved to; a config that keeps
    # "all-linear", or names modules on the base model, loads the same.
    ref = reference("gpt2")
    directory = copy_adapter("gpt2", "all_linear", tmp_path)
    edit_config(directory, target_modules="all-linear")
    weights = directory / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    prefix = "base_model.model."
    renamed = {
        key.replace(f"{prefix}transformer.", prefix): value
        for key, value in tensors.items()
    }
    safetensors.numpy.save_file(renamed, weights)

    model = keras_lora.load_peft_adapter(causal_lm("gpt2"), directory)

    np.testing.assert_allclose(logits(model, ref), ref["all_linear"], atol=ATOL)


def test_load_into_a_backbone_alone():
    ref = reference("llama")
    model = causal_lm("llama")
    backbone = keras_lora.load_peft_adapter(model.backbone, FIXTURES / "llama" / "dora")

    assert backbone is model.backbone
    np.testing.assert_allclose(logits(model, ref), ref["dora"], atol=ATOL)


def test_load_into_a_lora_model_adds_the_adapter_by_name():
    ref = reference("qwen2")
    model = keras_lora.load_peft_adapter(causal_lm("qwen2"), FIXTURES / "qwen2" / "qv")
    model = keras_lora.load_peft_adapter(
        model, FIXTURES / "qwen2" / "dora", adapter_name="dora"
    )
    # The new adapter is inactive until named.
    np.testing.assert_allclose(logits(model, ref), ref["qv"], atol=ATOL)
    keras_lora.set_adapter(model, "dora")
    np.testing.assert_allclose(logits(model, ref), ref["dora"], atol=ATOL)


def test_load_replaces_an_adapter_of_the_same_name():
    ref = reference("gemma")
    model = keras_lora.load_peft_adapter(causal_lm("gemma"), FIXTURES / "gemma" / "qv")
    model = keras_lora.load_peft_adapter(model, FIXTURES / "gemma" / "dora")
    np.testing.assert_allclose(logits(model, ref), ref["dora"], atol=ATOL)


def test_gpt2_fused_c_attn_loads_as_query_key_value_with_a_shared_a():
    model = keras_lora.load_peft_adapter(causal_lm("gpt2"), FIXTURES / "gpt2" / "qv")
    tensors = safetensors.numpy.load_file(
        FIXTURES / "gpt2" / "qv" / "adapter_model.safetensors"
    )
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    attention = model.backbone.transformer_layers[0]._self_attention_layer
    layers = (attention.query_dense, attention.key_dense, attention.value_dense)
    for block, layer in enumerate(layers):
        adapter = layer.adapters["default"]
        lora_a = keras.ops.convert_to_numpy(adapter.lora_a)
        lora_b = keras.ops.convert_to_numpy(adapter.lora_b)
        np.testing.assert_array_equal(lora_a.reshape(32, -1), a.T)
        np.testing.assert_array_equal(
            lora_b.reshape(lora_b.shape[0], -1), b[32 * block : 32 * (block + 1)].T
        )


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_gives_the_same_factors_and_logits(family, adapter, tmp_path):
    ref = reference(family)
    model = keras_lora.load_peft_adapter(causal_lm(family), FIXTURES / family / adapter)
    expected = logits(model, ref)

    keras_lora.save_peft_adapter(model, tmp_path / "saved")

    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = safetensors.numpy.load_file(
        tmp_path / "saved" / "adapter_model.safetensors"
    )
    original = safetensors.numpy.load_file(
        FIXTURES / family / adapter / "adapter_model.safetensors"
    )
    assert saved.keys() == original.keys()
    if family != "gpt2":  # GPT-2's c_attn saves stacked, as the next test checks
        for key, value in original.items():
            np.testing.assert_array_equal(saved[key], value, err_msg=key)
    reloaded = keras_lora.load_peft_adapter(causal_lm(family), tmp_path / "saved")
    np.testing.assert_allclose(logits(reloaded, ref), expected, atol=1e-5)


def test_save_writes_peft_config_fields(tmp_path):
    model = keras_lora.load_peft_adapter(
        causal_lm("llama"), FIXTURES / "llama" / "all_linear"
    )
    keras_lora.save_peft_adapter(
        model, tmp_path / "saved", base_model_name_or_path="org/tiny-llama"
    )
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    original = json.loads(
        (FIXTURES / "llama" / "all_linear" / "adapter_config.json").read_text()
    )

    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert config["r"] == original["r"]
    assert config["lora_alpha"] == original["lora_alpha"]
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["fan_in_fan_out"] is False
    assert config["bias"] == "none"


def test_save_gpt2_query_and_value_as_one_c_attn_adapter(tmp_path):
    ref = reference("gpt2")
    model = keras_lora.convert(
        causal_lm("gpt2"),
        rank=2,
        alpha=3,
        targets=["query", "value"],
        rank_pattern={"value": 3},
        alpha_pattern={"value": 6},
    )
    randomize_adapters(model)
    expected = logits(model, ref)

    keras_lora.save_peft_adapter(model, tmp_path / "saved")

    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    tensors = safetensors.numpy.load_file(
        tmp_path / "saved" / "adapter_model.safetensors"
    )
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert config["target_modules"] == ["c_attn"]
    assert config["fan_in_fan_out"] is True
    assert b.shape == (96, 5)
    np.testing.assert_array_equal(b[32:64], 0.0)  # key: not adapted
    np.testing.assert_array_equal(b[:32, 2:], 0.0)  # block-diagonal
    reloaded = keras_lora.load_peft_adapter(causal_lm("gpt2"), tmp_path / "saved")
    np.testing.assert_allclose(logits(reloaded, ref), expected, atol=1e-5)


def test_load_refuses_what_peft_adapters_hold_beyond_lora_listing_every_problem(
    tmp_path,
):
    directory = copy_adapter("llama", "qv", tmp_path)
    edit_config(
        directory, bias="all", modules_to_save=["lm_head"], init_lora_weights="pissa"
    )
    model = causal_lm("llama")

    with pytest.raises(ValueError) as raised:
        keras_lora.load_peft_adapter(model, directory)

    message = str(raised.value)
    assert "3 problems" in message
    assert "bias='all'" in message
    assert "modules_to_save=['lm_head']" in message
    assert "init_lora_weights='pissa' rewrote the base weights" in message
    assert lora_paths(model) == []


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"peft_type": "IA3"}, "keras_lora maps LoRA adapters (peft_type 'LORA') only"),
        ({"r": 0}, "r must be a positive number, got 0"),
        (
            {"rank_pattern": {"q_proj": 2}},
            "its factors have rank 4; the config gives it r=2",
        ),
        ({"use_dora": True}, "use_dora is True in the config"),
        (
            {"lora_bias": True},
            "lora_bias=True is a peft feature keras_lora does not map",
        ),
    ],
)
def test_load_refuses_a_config_it_cannot_map(tmp_path, changes, fragment):
    directory = copy_adapter("mistral", "qv", tmp_path)
    edit_config(directory, **changes)
    model = causal_lm("mistral")

    with pytest.raises(ValueError, match="nothing was changed") as raised:
        keras_lora.load_peft_adapter(model, directory)

    assert fragment in str(raised.value)
    assert lora_paths(model) == []


def test_load_refuses_a_module_without_counterpart(tmp_path):
    directory = copy_adapter("llama", "qv", tmp_path)
    weights = directory / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), "float32")
    tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((64, 4), "float32")
    safetensors.numpy.save_file(tensors, weights)
    model = causal_lm("llama")

    with pytest.raises(ValueError, match="module 'lm_head' has no counterpart"):
        keras_lora.load_peft_adapter(model, directory)
    assert lora_paths(model) == []


def test_load_refuses_missing_files_and_torch_pickles(tmp_path):
    directory = copy_adapter("llama", "qv", tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")

    with pytest.raises(ValueError, match="adapter_model.bin .a torch pickle."):
        keras_lora.load_peft_adapter(causal_lm("llama"), directory)
    with pytest.raises(ValueError, match="is not a peft adapter directory"):
        keras_lora.load_peft_adapter(causal_lm("llama"), tmp_path / "missing")


def test_load_and_save_refuse_an_unknown_family_naming_the_supported_ones(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    supported = "Llama (2, 3), Mistral, Qwen2, Gemma (1, 2), GPT-2"

    with pytest.raises(ValueError, match=re.escape(supported)):
        keras_lora.load_peft_adapter(model, FIXTURES / "llama" / "qv")
    with pytest.raises(ValueError, match=re.escape(supported)):
        keras_lora.save_peft_adapter(keras_lora.convert(model, rank=1), tmp_path / "a")


def test_load_refuses_a_bad_adapter_name():
    with pytest.raises(ValueError, match="adapter_name=''"):
        keras_lora.load_peft_adapter(causal_lm("llama"), FIXTURES / "llama" / "qv", "")


def test_save_refuses_what_a_peft_adapter_cannot_hold(tmp_path):
    model = keras_lora.convert(
        causal_lm("qwen2"), rank=2, targets=["query"], bias="lora_only"
    )
    with pytest.raises(ValueError, match="trains weights besides its factors"):
        keras_lora.save_peft_adapter(model, tmp_path / "a")

    model = keras_lora.convert(causal_lm("llama"), rank=2, targets=["token_embedding"])
    with pytest.raises(ValueError, match="are no module peft adapts"):
        keras_lora.save_peft_adapter(model, tmp_path / "a")

    model = keras_lora.convert(
        causal_lm("llama"), rank=2, targets=["query", "value"], use_dora=True
    )
    value = model.backbone.transformer_layers[0]._self_attention_layer._value_dense
    value.add_adapter("spare", rank=2)
    value.delete_adapter("default")
    value.add_adapter("default", rank=2)
    with pytest.raises(ValueError, match="is DoRA on some layers and not on others"):
        keras_lora.save_peft_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="Received: adapter_name='other'"):
        keras_lora.save_peft_adapter(model, tmp_path / "a", adapter_name="other")
    with pytest.raises(TypeError, match="base_model_name_or_path=3"):
        keras_lora.save_peft_adapter(model, tmp_path / "a", base_model_name_or_path=3)
    assert not (tmp_path / "a").exists()


# The reverse direction, live: stock peft loads what save_peft_adapter wrote.


def peft_logits(family: str, directory, ref) -> np.ndarray:
    """peft's logits for the fixture's tokens with the adapter in `directory`,
    failing on any missing- or unexpected-key warning."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES / family / "model", attn_implementation="eager"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model, directory)
    keys = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert keys == []
    adapted = {name for name, _ in model.named_parameters() if "lora_" in name}
    saved = safetensors.numpy.load_file(directory / "adapter_model.safetensors")
    assert len(adapted) == len(saved)
    model.eval()
    with torch.no_grad():
        output = model(
            input_ids=torch.tensor(ref["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(ref["padding_mask"], dtype=torch.long),
        )
    return output.logits.numpy()


KERAS_ADAPTERS = {
    "llama": dict(
        targets=["query", "value", "feedforward_output_dense"],
        rank=4,
        alpha=8,
        rank_pattern={"transformer_layer_1/.*": 2},
    ),
    "gemma": dict(targets=["query", "value"], rank=4, alpha=4, use_dora=True),
    "qwen2": dict(targets=["key", "attention_output"], rank=3, use_rslora=True),
    "gpt2": dict(
        targets=["query", "value", "feedforward_intermediate_dense"],
        rank=2,
        alpha=3,
        rank_pattern={"value": 3},
    ),
    "mistral": dict(
        targets=["feedforward_gate_dense", "feedforward_intermediate_dense"],
        rank=2,
        alpha_pattern={"transformer_layer_0/.*": 5},
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_a_saved_adapter_with_the_same_logits(family, tmp_path):
    pytest.importorskip("peft")
    ref = reference(family)
    model = keras_lora.convert(causal_lm(family), **KERAS_ADAPTERS[family])
    randomize_adapters(model, seed=3)
    expected = logits(model, ref)

    keras_lora.save_peft_adapter(model, tmp_path / "saved")

    np.testing.assert_allclose(
        peft_logits(family, tmp_path / "saved", ref), expected, atol=ATOL
    )


def test_peft_loads_an_adapter_saved_after_loading_one(tmp_path):
    ref = reference("qwen2")
    model = keras_lora.load_peft_adapter(
        causal_lm("qwen2"), FIXTURES / "qwen2" / "all_linear"
    )
    keras_lora.save_peft_adapter(model, tmp_path / "saved")

    np.testing.assert_allclose(
        peft_logits("qwen2", tmp_path / "saved", ref), ref["all_linear"], atol=ATOL
    )
