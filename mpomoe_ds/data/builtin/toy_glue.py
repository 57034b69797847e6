"""The embedded default data sets ``toy_glue`` and ``toy_lm``: generated, never downloaded.

Small synthetic English tasks built from word lists and templates, so that a
pretrained encoder (all-MiniLM-L6-v2 upcycled to MoE) learns them for real in
a few CPU minutes and an untrained head stays at chance. Each task's
difficulty comes from structure a bag of words cannot read, not from label noise:

- **toy_sentiment** (2 classes, chance 50%): "the movie was great". The
  label is the polarity of the clause that counts: negation flips it ("was
  not great"), "X at first, but turned out Y" takes Y, "X, although some said
  Y" takes X. Filler phrases are noise. Logistic regression on unigram
  counts reaches about 60% validation accuracy, on bigrams about 87%.
- **toy_topic** (4 classes sports/food/technology/weather, chance 25%):
  sentences naming three topic keywords, often with a keyword from another
  topic as a distractor, sometimes "not about D1 or D2, it is about K" where
  the single K decides (unigram counts: about 85%).
- **toy_paraphrase** (sentence pairs, 2 classes, chance 50%): two
  descriptions of a scene (adjective, noun, activity, place) rendered with
  synonyms and different templates; label 1 when every slot means the same,
  0 when one or two slots differ (bag-of-words of the pair: chance). A
  fine-tuned MiniLM cross-encoder gets the two-slot negatives first.
- **toy_lm** (text only): sentences from the three generators, for causal LM.

Sizes (train / validation): sentiment 3000 / 300, topic 2000 / 400,
paraphrase 2400 / 400, lm 3000 / 300. Labels are exactly balanced in every
split, no text occurs twice within or across splits, and the longest example
is 28 MiniLM tokens (pairs included), so max_seq_len 32 truncates nothing.

Determinism: each (task, split) draws from ``random.Random(seed string)``,
whose seeding and ``random()``/``choice``/``shuffle`` are stable across
Python 3 versions and platforms. Changing a word list or template changes the
data: bump ``TOY_GLUE_VERSION`` (it is part of the seed) when you do.

Row format (also the jsonl format ``write_builtin`` writes):
``{"sentence": str, "label": int}`` (sentiment, topic),
``{"sentence1": str, "sentence2": str, "label": int}`` (paraphrase),
``{"text": str}`` (lm).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Union

TOY_GLUE_VERSION = 1

SPLIT_SIZES: Mapping[str, Mapping[str, int]] = MappingProxyType({
    "toy_sentiment": MappingProxyType({"train": 3000, "validation": 300}),
    "toy_topic": MappingProxyType({"train": 2000, "validation": 400}),
    "toy_paraphrase": MappingProxyType({"train": 2400, "validation": 400}),
    "toy_lm": MappingProxyType({"train": 3000, "validation": 300}),
})

# Builtin data-set name -> its tasks (in task-id order).
BUILTINS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "toy_glue": ("toy_sentiment", "toy_topic", "toy_paraphrase"),
    "toy_lm": ("toy_lm",),
})

NUM_LABELS: Mapping[str, int] = MappingProxyType({"toy_sentiment": 2, "toy_topic": 4, "toy_paraphrase": 2})

Row = dict[str, Union[str, int]]

# --------------------------------------------------------------------------- sentiment

_SUBJECTS = ("the movie", "the film", "this book", "the novel", "the restaurant", "the meal", "the hotel",
             "the service", "the concert", "the show", "the game", "the app", "this phone", "the trip",
             "the class", "the album", "the museum", "the play")
_POSITIVE = ("great", "wonderful", "excellent", "delightful", "superb", "charming", "brilliant", "enjoyable",
             "lovely", "fantastic", "pleasant", "impressive", "fun", "beautiful", "amazing", "memorable")
_NEGATIVE = ("terrible", "awful", "boring", "dreadful", "disappointing", "bland", "mediocre", "horrible",
             "dull", "annoying", "poor", "tedious", "ugly", "painful", "forgettable", "clumsy")
_INTENSIFIERS = ("", "", "very ", "really ", "quite ", "truly ", "rather ", "so ")
_PREFIXES = ("honestly, ", "overall, ", "to be fair, ", "frankly, ", "in my opinion, ", "well, ", "i think ")
_SUFFIXES = (" today", " this time", " again", " as usual", " for sure", " if you ask me")


def _adjective(rng: random.Random, polarity: int) -> str:
    return rng.choice(_POSITIVE if polarity else _NEGATIVE)


def _sentiment_core(rng: random.Random, label: int) -> str:
    """One clause structure; the comment says which adjective decides the label."""
    subj, inten = rng.choice(_SUBJECTS), rng.choice(_INTENSIFIERS)
    form = rng.choices(("plain", "and", "negated", "but", "although"), weights=(5, 4, 4, 4, 3))[0]
    if form == "plain":  # the only adjective decides
        return rng.choice((f"{subj} was {inten}{_adjective(rng, label)}",
                           f"i found {subj} {inten}{_adjective(rng, label)}",
                           f"{subj} felt {inten}{_adjective(rng, label)}"))
    if form == "and":  # two adjectives, same polarity
        return f"{subj} was {inten}{_adjective(rng, label)} and {_adjective(rng, label)}"
    if form == "negated":  # negation flips the adjective's polarity
        adj = _adjective(rng, 1 - label)
        return rng.choice((f"{subj} was not {inten}{adj}", f"i would not call {subj} {adj}",
                           f"{subj} was never {adj}", f"nobody found {subj} {adj}"))
    if form == "but":  # the clause after "but" decides
        first, last = _adjective(rng, 1 - label), _adjective(rng, label)
        return rng.choice((f"{subj} seemed {first} at first, but it turned out {inten}{last}",
                           f"{subj} looked {first}, but it was actually {inten}{last}"))
    # "although": the main (first) clause decides, the concession is noise
    main, concession = _adjective(rng, label), _adjective(rng, 1 - label)
    return rng.choice((f"{subj} was {inten}{main}, although some said it was {concession}",
                       f"{subj} was {inten}{main} even though the reviews called it {concession}"))


def _sentiment_row(rng: random.Random, label: int) -> Row:
    text = _sentiment_core(rng, label)
    if rng.random() < 0.3:
        text = rng.choice(_PREFIXES) + text
    if rng.random() < 0.3:
        text += rng.choice(_SUFFIXES)
    return {"sentence": text, "label": label}


# --------------------------------------------------------------------------- topic

_TOPIC_WORDS = (
    ("football", "the goalkeeper", "the tournament", "the referee", "the stadium", "the marathon", "tennis",
     "the coach", "the playoffs", "the striker", "basketball", "the championship", "the athletes", "the team"),
    ("the recipe", "the chef", "tomato soup", "the bakery", "dessert", "pasta", "the flavors", "spices",
     "breakfast", "cheese", "noodles", "the salad", "the oven", "fresh bread"),
    ("the software", "laptops", "the processor", "smartphones", "the algorithm", "the database", "robots",
     "the internet", "keyboards", "the startup", "the server", "the website", "the compiler", "computer chips"),
    ("the rain", "the forecast", "a thunderstorm", "the humidity", "snow", "the temperature", "strong wind",
     "the clouds", "the drought", "a hurricane", "the fog", "sunshine", "frost", "the heatwave"),
)
_PEOPLE = ("my friend", "the teacher", "our neighbor", "the host", "my sister", "a colleague", "the reporter")
_TIMES = ("", "", " today", " this morning", " last night", " all week")
_LIST_TEMPLATES = ("the report mentioned {0}, {1} and {2}{t}",
                   "{p} kept talking about {0}, {1} and {2}{t}",
                   "we read an article on {0}, {1} and {2}{t}",
                   "{0}, {1} and {2} were on the agenda{t}",
                   "{p} asked me about {0}, {1} and {2}{t}")


def _topic_row(rng: random.Random, label: int) -> Row:
    own = _TOPIC_WORDS[label]
    other = _TOPIC_WORDS[rng.choice([t for t in range(len(_TOPIC_WORDS)) if t != label])]
    person, when = rng.choice(_PEOPLE), rng.choice(_TIMES)
    if rng.random() < 0.15:  # two distractors, one keyword: the negation decides
        d1, d2 = rng.sample(other, 2)
        text = f"{person} said it was not about {d1} or {d2}, it was about {rng.choice(own)}{when}"
    else:
        words = rng.sample(own, 2) + [rng.choice(other)] if rng.random() < 0.5 else rng.sample(own, 3)
        rng.shuffle(words)
        text = rng.choice(_LIST_TEMPLATES).format(*words, p=person, t=when)
    return {"sentence": text, "label": label}


# --------------------------------------------------------------------------- paraphrase

# Each slot is a list of concepts; each concept a tuple of interchangeable surface forms.
_SLOTS = {
    "adj": (("small", "little", "tiny"), ("big", "large", "huge"), ("old", "elderly"), ("young", "youthful"),
            ("happy", "cheerful", "glad"), ("sad", "unhappy", "gloomy"), ("quiet", "silent"),
            ("loud", "noisy"), ("fast", "quick", "speedy"), ("lazy", "idle")),
    "noun": (("dog", "hound"), ("cat", "kitty"), ("car", "automobile"), ("child", "kid"),
             ("man", "gentleman"), ("woman", "lady"), ("horse", "steed"), ("boat", "ship"),
             ("teacher", "instructor"), ("bird",)),
    "verb": (("sleeping", "napping", "resting"), ("eating", "dining"), ("running", "sprinting"),
             ("waiting", "lingering"), ("singing", "chanting"), ("playing",), ("working", "laboring"),
             ("laughing", "giggling"), ("crying", "weeping"), ("shouting", "yelling")),
    "place": (("in the garden", "in the yard"), ("near the river", "by the stream"),
              ("at the station", "at the depot"), ("in the kitchen",), ("on the beach", "on the shore"),
              ("in the park",), ("in the city", "downtown"), ("in the forest", "in the woods"),
              ("at the market", "at the bazaar"), ("on the hill", "on the slope")),
}
_SCENE_TEMPLATES = ("the {adj} {noun} is {verb} {place}",
                    "{place}, the {adj} {noun} is {verb}",
                    "there is {a} {adj} {noun} {verb} {place}",
                    "{a} {adj} {noun} is {verb} {place} right now",
                    "{place} you can see {a} {adj} {noun} {verb}")


def _render_scene(rng: random.Random, concepts: dict[str, int]) -> str:
    words = {slot: rng.choice(_SLOTS[slot][i]) for slot, i in concepts.items()}
    article = "an" if words["adj"][0] in "aeiou" else "a"
    return rng.choice(_SCENE_TEMPLATES).format(a=article, **words)


def _paraphrase_row(rng: random.Random, label: int) -> Row:
    scene = {slot: rng.randrange(len(options)) for slot, options in _SLOTS.items()}
    other = dict(scene)
    if label == 0:  # one or two slots change meaning: two-slot negatives are learned first, one-slot ones later
        for slot in rng.sample(sorted(_SLOTS), rng.choice((1, 2))):
            other[slot] = rng.choice([i for i in range(len(_SLOTS[slot])) if i != scene[slot]])
    first = _render_scene(rng, scene)
    second = _render_scene(rng, other)
    while second == first:  # identical strings would make positives trivial
        second = _render_scene(rng, other)
    return {"sentence1": first, "sentence2": second, "label": label}


# --------------------------------------------------------------------------- generation

_ROW_MAKERS: Mapping[str, Callable[[random.Random, int], Row]] = MappingProxyType({
    "toy_sentiment": _sentiment_row, "toy_topic": _topic_row, "toy_paraphrase": _paraphrase_row,
})


def _lm_row(rng: random.Random, _: int) -> Row:
    task = rng.choice(sorted(_ROW_MAKERS))
    row = _ROW_MAKERS[task](rng, rng.randrange(NUM_LABELS[task]))
    text = row.get("sentence") or f"{row['sentence1']}. {row['sentence2']}"
    return {"text": f"{text}."}


def _row_key(row: Row) -> tuple:
    return tuple(v for k, v in sorted(row.items()) if k != "label")


def builtin_task_names(name: str) -> tuple[str, ...]:
    """The tasks of builtin data set ``name`` (KeyError lists the builtin names)."""
    if name not in BUILTINS:
        raise KeyError(f"unknown builtin data set {name!r}; builtin data sets are {sorted(BUILTINS)}")
    return BUILTINS[name]


def generate(task: str, split: str) -> list[Row]:
    """The rows of one builtin task split, identical on every call and machine.

    Validation is generated first and the training split skips its texts, so
    no validation example is seen in training.
    """
    if task not in SPLIT_SIZES or split not in SPLIT_SIZES[task]:
        known = [f"{t}/{s}" for t in SPLIT_SIZES for s in SPLIT_SIZES[t]]
        raise KeyError(f"no builtin split {task}/{split}; have {known}")
    seen = {_row_key(r) for r in generate(task, "validation")} if split == "train" else set()
    rng = random.Random(f"toy_glue/v{TOY_GLUE_VERSION}/{task}/{split}")
    size = SPLIT_SIZES[task][split]
    if task == "toy_lm":
        make, labels = _lm_row, [0] * size
    else:
        # Exactly balanced labels, in random order.
        make, labels = _ROW_MAKERS[task], [i % NUM_LABELS[task] for i in range(size)]
        rng.shuffle(labels)
    rows = []
    for label in labels:
        row = make(rng, label)
        while _row_key(row) in seen:  # redraw duplicates (rare: the template space is large)
            row = make(rng, label)
        seen.add(_row_key(row))
        rows.append(row)
    return rows


def write_builtin(name: str, out_dir: Union[str, Path]) -> dict[str, dict[str, Path]]:
    """Write builtin data set ``name`` as ``out_dir/<task>/{train,validation}.jsonl``.

    Returns ``{task: {split: path}}``. The files load back with a data config
    such as ``tasks: [{name: toy_sentiment, train_file: .../train.jsonl,
    validation_file: .../validation.jsonl}]`` and are the template for your
    own data: one JSON object per line with the task's text and label columns.
    """
    paths: dict[str, dict[str, Path]] = {}
    for task in builtin_task_names(name):
        task_dir = Path(out_dir) / task
        task_dir.mkdir(parents=True, exist_ok=True)
        paths[task] = {}
        for split in SPLIT_SIZES[task]:
            path = task_dir / f"{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in generate(task, split)))
            paths[task][split] = path
    return paths
