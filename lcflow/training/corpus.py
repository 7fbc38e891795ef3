"""A broad, seeded text corpus for dense alignment (no downloads: everything is made here).

Dense alignment must map the KV of tokens the task's test split never shows in training (its
names and values are disjoint from the train split's), so it learns from many kinds of text:

    facts      training-split documents of every facts task, sharer and receiver sides, with
               real, invented and broad-word values (lcflow.tasks)
    words      sentences of random words from the 17k-word list, capitalised like names and
               places now and then: token coverage
    prose      paragraphs of the Python standard library's docstrings: ordinary English

Test-split documents are never drawn here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import warnings

from lcflow.tasks import get_task
from lcflow.tasks.vocab import load_vocab, load_word_list

# Standard-library modules whose docstrings are mostly prose.
_PROSE_MODULES = (
    "argparse collections json logging pathlib subprocess threading asyncio email unittest typing "
    "datetime decimal fractions statistics random textwrap string csv sqlite3 zipfile tarfile shutil "
    "functools itertools contextlib dataclasses enum heapq bisect calendar locale gettext socket ssl "
    "selectors signal codecs difflib pprint copy pickle shelve gzip bz2 lzma hashlib hmac secrets sched "
    "queue multiprocessing uuid base64 struct weakref types abc numbers inspect ast tokenize pdb timeit "
    "trace tracemalloc warnings traceback glob fnmatch tempfile filecmp configparser plistlib wave"
).split()


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Paragraphs (120-700 characters, mostly letters) of stdlib docstrings, in a fixed order.

    They come from the running Python, so another Python version gives a slightly different set."""
    paragraphs: list[str] = []
    with warnings.catch_warnings():  # some attributes are deprecated aliases (typing.io)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _PROSE_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            names = [a for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in [module] + [getattr(module, a) for a in names]:
                if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
                    paragraphs.extend(_paragraphs(inspect.getdoc(obj) or ""))
    return tuple(dict.fromkeys(paragraphs))


def _paragraphs(doc: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", doc):
        text = " ".join(block.split())
        letters = sum(c.isalpha() or c == " " for c in text)
        if 120 <= len(text) <= 700 and letters / len(text) > 0.9:
            out.append(text)
    return out


def word_sentences(rng: random.Random, count: int) -> list[str]:
    """Short documents of random words and training names (a few sentences each)."""
    words = load_word_list()
    vocab = load_vocab("train")
    documents = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            picked = [rng.choice(words) for _ in range(rng.randint(5, 12))]
            picked = [w.capitalize() if rng.random() < 0.15 else w for w in picked]
            if rng.random() < 0.5:
                picked.insert(
                    rng.randrange(len(picked)),
                    f"{rng.choice(vocab.first_names)} {rng.choice(vocab.last_names)}",
                )
            sentences.append(" ".join(picked).capitalize() + ".")
        documents.append(" ".join(sentences))
    return documents


def fact_documents(count: int, seed: int) -> list[str]:
    """Training-split documents of all facts tasks and value kinds, both sides."""
    tasks = [
        get_task("facts-cross"),
        get_task("facts-cross-words"),
        get_task("facts-cross-pseudo"),
        get_task("facts-twohop"),
        get_task("facts-same-words"),
    ]
    documents: list[str] = []
    index = 0
    while len(documents) < count:
        task = tasks[index % len(tasks)]
        sample = task.sample("train", index // len(tasks), seed)
        documents.append(sample.sharer_context)
        if not sample.same_context and len(documents) < count:
            documents.append(sample.receiver_context)
        index += 1
    return documents


def alignment_corpus(count: int, seed: int = 0) -> list[str]:
    """`count` documents: half facts, a quarter random words, a quarter prose (as far as it goes),
    shuffled with `seed`."""
    rng = random.Random(f"alignment-corpus|{seed}")
    prose = list(prose_paragraphs())
    rng.shuffle(prose)
    prose = prose[: count // 4]
    words = word_sentences(rng, count // 4)
    facts = fact_documents(count - len(prose) - len(words), seed)
    documents = facts + words + prose
    rng.shuffle(documents)
    return documents


def vocabulary_documents(tokenizer, count: int, tokens_per_document: int = 48, seed: int = 0) -> list[str]:
    """`count` documents of random vocabulary entries of `tokenizer`, joined as they decode.

    A sweep of the vocabulary: every entry appears once (shuffled) before any repeats, so a map
    fitted on these sees the pieces of names and values no real document in its corpus held
    (the test split's are disjoint from training). Special tokens and entries that do not decode
    to printable text (byte fragments) are left out."""
    special = set(tokenizer.all_special_ids)
    entries = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id not in special and text.strip() and text.isprintable() and "\ufffd" not in text:
            entries.append(text)
    rng = random.Random(f"vocabulary-documents|{seed}")
    order: list[str] = []
    documents = []
    for _ in range(count):
        if len(order) < tokens_per_document:
            refill = entries[:]
            rng.shuffle(refill)
            order.extend(refill)
        documents.append("".join(order[:tokens_per_document]))
        del order[:tokens_per_document]
    return documents
