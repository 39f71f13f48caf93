"""Parity with peft itself: each fixture of tests/fixtures/peft/ (written by
tests/fixtures/make_peft_fixtures.py with torch and peft 0.21) holds a torch
layer's weights, peft's LoRA factors and peft's outputs unmerged and merged;
the matching keras_lora wrapper must compute the same numbers. No torch here.

Layouts, torch -> Keras (`testing.peft_fixtures` converts):

- Linear: weight `(out, in)` -> Dense kernel `(in, out)`, `W.T`. lora_A
  `(r, in)` -> lora_a `(in, r)`, `A.T`; lora_B `(out, r)` -> lora_b
  `(r, out)`, `B.T`. Inputs and outputs `(..., features)` in both.
- ConvNd: weight `(out, in / groups, *k)` -> ConvND kernel
  `(*k, in / groups, out)`: axes `(2, ..., n + 1, 1, 0)`. lora_A `(r, in, *k)`
  -> lora_a `(*k, in, r)` and lora_B `(out, r / groups, 1, ...)` -> lora_b
  `(1, ..., r / groups, out)`, the same transposition. Inputs and outputs are
  channels_first in torch, channels_last in Keras: `np.moveaxis(x, 1, -1)`.
  torch's padding "same" is Keras' "same" (both pad the extra one at the end),
  and the fixtures' integer paddings are what "same" pads on their sizes.
- Grouped ConvNd: peft 0.21 builds lora_A ungrouped, `(r, in, *k)`, so its
  rank channel j may read any input channel; keras_lora's lora_a is grouped
  as the base, `(*k, in / groups, r)`, rank channel j reading only the inputs
  of group `j // (r / groups)`. The fixture's lora_A is zero across groups, so
  keras_lora can hold it (the diagonal blocks, concatenated along r). peft
  does not merge grouped convolutions; keras_lora's merged output must equal
  peft's unmerged one.
- Embedding: weight `(num, dim)` -> embeddings `(num, dim)`, unchanged.
  lora_embedding_A `(r, num)` -> lora_a `(num, r)`, `A.T`; lora_embedding_B
  `(dim, r)` -> lora_b `(r, dim)`, `B.T`.
- DoRA magnitude: `(out,)` for Linear and Embedding, `(1, out, 1, ...)` for
  ConvNd -> `(out,)`.

Tolerance: float32 arithmetic on values of magnitude up to about 10,
`atol=1e-5` and `rtol=1e-6`.
"""

import numpy as np
import pytest
from testing import peft_fixtures
from testing.references import numpy

ATOL, RTOL = 1e-5, 1e-6


def dilated(name):
    dilation = peft_fixtures.load(name).config["kwargs"].get("dilation", [1])
    return any(rate > 1 for rate in dilation)


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_fixtures_cover_every_torch_layer_and_variant():
    configs = [peft_fixtures.load(name).config for name in peft_fixtures.NAMES]
    layers = {config["layer"] for config in configs}
    assert layers == {"Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding"}
    assert any(config["use_rslora"] for config in configs)
    assert {c["layer"] for c in configs if c["use_dora"]} >= {"Linear", "Conv2d"}


@pytest.mark.parametrize("name", peft_fixtures.NAMES)
def test_keras_base_layer_matches_the_torch_layer(name):
    # Checks the layout conversion before any LoRA: the weights, the padding.
    fixture = peft_fixtures.load(name)
    outputs = fixture.base_layer()(fixture.tensor("inputs"))
    assert_close(numpy(outputs), fixture.tensor("base_outputs"))


@pytest.mark.parametrize("training", [True, False], ids=["factorised", "inference"])
@pytest.mark.parametrize("name", peft_fixtures.NAMES)
def test_unmerged_outputs_match_peft(name, training):
    # `training=True` (no dropout) takes the factorised path; inference may
    # fold the adapter into the kernel for the call.
    fixture = peft_fixtures.load(name)
    outputs = numpy(fixture.wrapper()(fixture.tensor("inputs"), training=training))
    if not dilated(name):
        assert_close(outputs, fixture.tensor("outputs"))
        return
    # peft 0.21 builds a conv's lora_A without the base's dilation
    # (huggingface/peft#3697, fixed by an open pull request), so its unmerged
    # output is not its own merged output. keras_lora dilates A as the base
    # does: unmerged, it computes what peft's merged layer computes.
    assert_close(outputs, fixture.tensor("merged_outputs"))
    assert not np.allclose(outputs, fixture.tensor("outputs"), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", peft_fixtures.NAMES)
def test_merged_kernel_and_outputs_match_peft(name):
    fixture = peft_fixtures.load(name)
    wrapper = fixture.wrapper()
    wrapper.merge()
    outputs = numpy(wrapper(fixture.tensor("inputs")))
    if fixture.config["peft_merges"]:
        assert_close(numpy(wrapper.kernel_variable), fixture.kernel("merged_weight"))
        assert_close(outputs, fixture.tensor("merged_outputs"))
    else:
        assert_close(outputs, fixture.tensor("outputs"))
