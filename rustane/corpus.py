"""The built-in training corpus: short children's stories generated from a seeded grammar.

No download is ever needed: ``generate_stories(n, seed)`` returns the same ``n`` stories for the
same seed on every machine (it uses only ``random.Random``, whose generator and methods used
here are stable across Python versions). The grammar is small (a few hundred words) with
consistent structure: a setting, a character who wants something, a problem, dialogue, a
resolution and a moral. That gives a model plenty of learnable regularities (agreement of names
and pronouns across sentences, quoted dialogue, recurring formulas) at a tiny vocabulary.
"""

from __future__ import annotations

import random

__all__ = ["generate_stories", "corpus_text", "GRAMMAR_VERSION"]

# Bump when the grammar changes: it is part of the cache key of tokenized corpora.
GRAMMAR_VERSION = 1

# (name, pronoun subject, object, possessive, kind)
CHARACTERS = [
    ("Lily", "she", "her", "her", "girl"), ("Tom", "he", "him", "his", "boy"),
    ("Mia", "she", "her", "her", "girl"), ("Ben", "he", "him", "his", "boy"),
    ("Sam", "he", "him", "his", "boy"), ("Anna", "she", "her", "her", "girl"),
    ("Max", "he", "him", "his", "dog"), ("Lucy", "she", "her", "her", "cat"),
    ("Pip", "he", "him", "his", "bird"), ("Rosie", "she", "her", "her", "bunny"),
    ("Leo", "he", "him", "his", "lion"), ("Daisy", "she", "her", "her", "duck"),
]
FRIENDS = ["mom", "dad", "grandma", "a kind old man", "a little frog", "a wise owl",
           "a friendly bear", "a small mouse", "the teacher", "a big brother"]
PLACES = ["the park", "the forest", "the beach", "a small town", "the garden", "the farm",
          "a big city", "the hill", "the river", "the school"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "bright", "quiet"]
TIMES = ["Once upon a time", "One day", "One morning", "Long ago", "One sunny afternoon"]
ADJ = ["red", "blue", "shiny", "little", "big", "soft", "yellow", "old", "new", "green"]
OBJECTS = ["ball", "kite", "box", "hat", "book", "toy car", "flower", "cake", "boat", "drum",
           "shell", "apple"]
WANTS = ["play with", "find", "share", "fix", "give away", "show everyone"]
PROBLEMS = [
    "the {obj} fell into the water",
    "the {obj} got stuck in a tall tree",
    "the wind blew the {obj} away",
    "the {obj} broke into two pieces",
    "a big dog ran off with the {obj}",
    "{pro} could not find the {obj} anywhere",
]
FEELINGS_BAD = ["sad", "worried", "scared", "upset", "angry"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "thankful"]
HELPS = [
    "{friend} helped {obj_pro} get the {obj} back",
    "{friend} showed {obj_pro} how to fix the {obj}",
    "{name} and {friend} looked everywhere until they found the {obj}",
    "{friend} used a long stick to reach the {obj}",
    "{friend} had an idea and they worked together",
]
SAY_BAD = ["Oh no, my {obj}!", "What can I do now?", "I want my {obj} back.",
           "Can you help me, please?"]
SAY_HELP = ["Do not worry, I will help you.", "Let us try together.", "I know what to do.",
            "Be brave, we can fix it."]
SAY_THANKS = ["Thank you so much!", "You are a good friend.", "I am so happy now!",
              "Thank you for helping me."]
MORALS = [
    "It is good to help your friends.",
    "When we work together, hard things become easy.",
    "Sharing makes everyone happy.",
    "Being kind is the best thing you can do.",
    "Do not give up, and ask for help when you need it.",
    "A true friend is always there for you.",
]
ENDINGS = [
    "From that day on, {name} and {friend} were best friends.",
    "{name} played with the {obj} all day long.",
    "That night, {name} went to sleep with a big smile.",
    "{name} learned something new that day.",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _story(rng: random.Random) -> str:
    name, pro, obj_pro, pos, kind = rng.choice(CHARACTERS)
    friend = rng.choice(FRIENDS)
    obj = f"{rng.choice(ADJ)} {rng.choice(OBJECTS)}"
    place = rng.choice(PLACES)
    f = dict(name=name, pro=pro, obj_pro=obj_pro, pos=pos, friend=friend, obj=obj)
    s: list[str] = []
    s.append(f"{rng.choice(TIMES)}, there was a {kind} named {name}.")
    s.append(f"{_cap(pro)} lived near {place}, and {pro} had a {obj}.")
    if rng.random() < 0.5:
        s.append(f"It was a {rng.choice(WEATHER)} day, so {name} went to {place}.")
    s.append(f"{name} wanted to {rng.choice(WANTS)} {pos} {obj}.")
    s.append(f"But then {rng.choice(PROBLEMS).format(**f)}.")
    s.append(f"{name} felt {rng.choice(FEELINGS_BAD)}.")
    s.append(f'"{rng.choice(SAY_BAD).format(**f)}" said {name}.')
    s.append(f"Then {friend} came by.")
    s.append(f'"{rng.choice(SAY_HELP)}" said {friend}.')
    s.append(_cap(rng.choice(HELPS).format(**f)) + ".")
    s.append(f"{name} was very {rng.choice(FEELINGS_GOOD)}.")
    s.append(f'"{rng.choice(SAY_THANKS)}" {pro} said.')
    s.append(_cap(rng.choice(ENDINGS).format(**f)))
    if rng.random() < 0.7:
        s.append(f"The moral of the story is: {rng.choice(MORALS)}")
    return " ".join(s)


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` stories, deterministic in ``seed``."""
    if n < 0:
        raise ValueError(f"generate_stories: n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]


def corpus_text(n: int, seed: int = 0) -> str:
    """The stories joined one per paragraph (blank line between), as written to disk."""
    return "\n\n".join(generate_stories(n, seed)) + "\n"
