"""Fine-tune a keras-hub causal LM with LoRA: pretrain, adapt, generate, reload.

Everything is offline and built here. A byte-level BPE tokenizer (GPT-2's
format) is learned from the docstrings of Python's standard library, and a tiny
`keras_hub.models.GPT2CausalLM` is pretrained on their sentences: that is the
"pretrained model", saved as a keras-hub preset directory. `keras_lora.convert`
then adds rank-8 adapters to the attention's query and value projections, and
the frozen model is fine-tuned on the Zen of Python (`import this`). Greedy
completions of the first words of each Zen line are compared before and after.
The adapter is saved, loaded into a fresh copy of the base (`from_preset` on
the saved directory), and the merged model is checked to generate the same text.

Training runs on token ids that the preprocessor computed once: given strings,
`fit` would tokenize them again every epoch.

Run: `python examples/causal_lm.py` (add `--smoke` for a few-second run,
`--out DIR` for where the base preset and the adapter go; default `runs/causal_lm`).
"""

import argparse
import codecs
import collections
import contextlib
import importlib
import inspect
import io
import itertools
import os
import re

import keras
import keras_hub
import numpy as np

import keras_lora

SEQUENCE = 40
MODULES = [
    "argparse", "bisect", "calendar", "collections", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "heapq", "http.client", "inspect", "io", "itertools", "json", "logging", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil", "socket",
    "statistics", "string", "subprocess", "tempfile", "textwrap", "threading",
    "typing", "unittest", "urllib.parse", "zipfile",
]  # fmt: skip
# GPT-2's pre-tokenization, simplified: a word, a number or a run of
# punctuation, each with the space before it.
WORD = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+")
END_OF_TEXT = "<|endoftext|>"


def docstring_sentences() -> list[str]:
    """One-line sentences from the docstrings of `MODULES` and their members."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module))
        for attribute, value in vars(module).items():
            if attribute.startswith("_") or inspect.getmodule(value) is not module:
                continue
            docs.append(inspect.getdoc(value))
            if inspect.isclass(value):
                docs += [
                    inspect.getdoc(v) for a, v in vars(value).items() if a[0] != "_"
                ]
    sentences = []
    for doc in filter(None, docs):
        for paragraph in doc.split("\n\n"):
            if ">>>" in paragraph or "::" in paragraph:
                continue  # code, not prose
            for sentence in re.split(r"(?<=\.)\s+", " ".join(paragraph.split())):
                if (
                    20 <= len(sentence) <= 90
                    and sentence.isascii()
                    and sentence[0].isupper()
                    and sentence.endswith(".")
                ):
                    sentences.append(sentence)
    return list(dict.fromkeys(sentences))


def zen_of_python() -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints it
        import this
    return codecs.decode(this.s, "rot13").splitlines()[2:]


def learn_bpe(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair encoding: repeatedly merge the most frequent adjacent pair of
    symbols within words. Symbols are GPT-2's byte-level characters (a space
    is "Ġ"); the texts are ASCII."""
    counts = collections.Counter(
        word.replace(" ", "Ġ") for text in texts for word in WORD.findall(text)
    )
    splits = {word: list(word) for word in counts}
    pairs, holders = collections.Counter(), collections.defaultdict(set)
    for word, symbols in splits.items():
        for pair in itertools.pairwise(symbols):
            pairs[pair] += counts[word]
            holders[pair].add(word)
    merges = []
    while pairs and len(merges) < num_merges:
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        for word in holders.pop(best):
            symbols = splits[word]
            for pair in itertools.pairwise(symbols):
                pairs[pair] -= counts[word]
                if pairs[pair] <= 0:
                    del pairs[pair]
            merged, index = [], 0
            while index < len(symbols):
                if tuple(symbols[index : index + 2]) == best:
                    merged.append(best[0] + best[1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            splits[word] = merged
            for pair in itertools.pairwise(merged):
                pairs[pair] += counts[word]
                holders[pair].add(word)
    return merges


def build_tokenizer(texts: list[str], num_merges: int):
    merges = learn_bpe(texts, num_merges)
    # Every printable ASCII character and the space, the merged symbols, then
    # the end-of-text token. As in GPT-2 it is not id 0: the preprocessor pads
    # with 0, and `generate` stops at the end token.
    symbols = [*map(chr, range(33, 127)), "Ġ"]
    symbols += [left + right for left, right in merges] + [END_OF_TEXT]
    vocabulary = {symbol: i for i, symbol in enumerate(dict.fromkeys(symbols))}
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=[f"{left} {right}" for left, right in merges]
    )


def fit(lm, preprocessor, texts, epochs, learning_rate, batch_size=32):
    """Trains `lm` (a model without preprocessor) on `texts`, tokenized once."""
    x, y, sample_weight = preprocessor(texts)
    lm.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = lm.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,  # keras-hub batches the arrays with tf.data, in order
        verbose=0,
    )
    return history.history["loss"]


def complete(lm, preprocessor, prompts) -> list[str]:
    """Greedy completions of `prompts`, up to the end-of-text token."""
    lm.compile(sampler="greedy")
    inputs = preprocessor.generate_preprocess(prompts, sequence_length=SEQUENCE)
    outputs = lm.generate(inputs, stop_token_ids=[preprocessor.tokenizer.end_token_id])
    return [
        str(text) for text in np.asarray(preprocessor.generate_postprocess(outputs))
    ]


def report(prompts, lines, completions, shown=3) -> None:
    exact = sum(text == line for text, line in zip(completions, lines, strict=True))
    print(
        f"   Zen lines completed exactly from their first words: {exact}/{len(lines)}"
    )
    for prompt, text in list(zip(prompts, completions, strict=True))[:shown]:
        print(f"   {prompt!r:18} -> {text!r}")


def main(out: str, smoke: bool = False) -> None:
    keras.utils.set_random_seed(0)
    num_merges, pretrain_epochs, finetune_epochs = (
        (60, 2, 5) if smoke else (300, 20, 60)
    )
    sentences = docstring_sentences()
    sentences = [
        sentences[i] for i in np.random.default_rng(0).permutation(len(sentences))
    ]
    # Lines of three words or more, prompted with their first two.
    zen = [line for line in zen_of_python() if len(line.split()) > 2]
    prompts = [" ".join(line.split()[:2]) for line in zen]

    tokenizer = build_tokenizer(sentences, num_merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=SEQUENCE
    )
    print(
        f"1. A byte-level BPE tokenizer learned from {len(sentences)} docstring "
        f"sentences of the standard library: {tokenizer.vocabulary_size()} tokens"
    )

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=256,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
        name="gpt2_backbone",
    )
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    losses = fit(lm, preprocessor, sentences, pretrain_epochs, learning_rate=3e-3)
    print(f"2. Pretrain GPT2CausalLM on them: loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    base_dir = os.path.join(out, "base")
    lm.save_to_preset(base_dir)
    preprocessor.save_to_preset(base_dir)
    print(f"   saved as a keras-hub preset in {base_dir}")
    base_completions = complete(lm, preprocessor, prompts)
    report(prompts, zen, base_completions)

    lora_lm = keras_lora.convert(lm, rank=8, alpha=16, targets=["query", "value"])
    print("3. Convert with targets=['query', 'value']: only the adapters train")
    keras_lora.print_trainable_parameters(lora_lm)
    losses = fit(lora_lm, preprocessor, zen, finetune_epochs, learning_rate=1e-2)
    print(
        f"4. Fine-tune on the Zen of Python: loss {losses[0]:.2f} -> {losses[-1]:.2f}"
    )
    completions = complete(lora_lm, preprocessor, prompts)
    report(prompts, zen, completions)

    adapter_dir = os.path.join(out, "adapter")
    keras_lora.save_adapter(lora_lm, adapter_dir)
    size = sum(
        os.path.getsize(os.path.join(adapter_dir, name))
        for name in os.listdir(adapter_dir)
    )
    fresh = keras_hub.models.GPT2CausalLM.from_preset(base_dir, preprocessor=None)
    reloaded = keras_lora.load_adapter(fresh, adapter_dir)
    same = complete(reloaded, preprocessor, prompts) == completions
    print(f"5. Saved the adapter to {adapter_dir} ({size:,d} bytes)")
    print(f"   loaded into from_preset({base_dir!r}): same text: {same}")

    merged = keras_lora.merge_and_unload(lora_lm)
    same = complete(merged, preprocessor, prompts) == completions
    print(
        f"6. Merged into a plain {type(merged).__name__} (no keras_lora layer "
        f"left): same text: {same}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few-second run")
    parser.add_argument(
        "--out",
        default=os.path.join("runs", "causal_lm"),
        help="where to write the base preset and the adapter (default: %(default)s)",
    )
    args = parser.parse_args()
    main(args.out, args.smoke)
