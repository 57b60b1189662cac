"""A labelled mixture the engine was never developed on: other tasks, other answer styles, its own generator.

    .venv/bin/python -m benchmarks.unseen_mixture --target capitals --out runs/unseen/capitals
    .venv/bin/python -m benchmarks.selection_quality --data runs/unseen/capitals --scorers gradient_alignment \
        --control-seeds 0 --out benchmarks/results/selection_quality_unseen

Why: every selection number of Sessions 3-5 was measured on the demo corpus (``p2d_ray/assets/synthetic.py``:
arithmetic / units word problems answered ``... #### n``). A selector tuned, even unknowingly, to that
generator would look better there than anywhere else. This mixture shares nothing with it but the idea of a
planted target: five short-answer tasks in plain sentences (no ``####``), each with clean rows, and the two
target-capable tasks also with the same two kinds of corruption a real corpus has (a wrong answer, the words of
prompt and response shuffled). Written once, deterministic in ``--seed``.

Tasks (``task`` column): ``capitals`` (country -> capital), ``letters`` (how many letters a word has),
``antonyms``, ``plurals``, ``chat`` (small talk answered by a generic sentence). ``--target`` is
``capitals`` or ``letters``: the probe (64 rows) is clean rows of the target, disjoint from the corpus prompts;
the hidden label ``is_clean_on_task`` (read only by ``report/precision.py``) is true for clean target rows.
``--targets capitals,letters`` writes one corpus for both (the first target's draw, one label
``is_clean_on_task_<target>`` per target) and a probe / held-out set per target (``<out>/<target>/``), for
issue 27's shared pass (``benchmarks/targets_unseen.py``).
Mixture shares mirror the demo's so the numbers are comparable: target clean 16 %, target wrong 8 %, target
shuffled 4 %, the other target-capable task 28 % (same corruption shares), the three other tasks 44 %.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from benchmarks import write_data_once

TARGETS = ("capitals", "letters")
LABEL = "is_clean_on_task"

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Hungary": "Budapest",
    "Czechia": "Prague",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "Ethiopia": "Addis Ababa",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "South Korea": "Seoul",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Turkey": "Ankara",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Brazil": "Brasilia",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Venezuela": "Caracas",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Iceland": "Reykjavik",
}
WORDS = [
    "garden",
    "window",
    "river",
    "pencil",
    "candle",
    "basket",
    "mirror",
    "ladder",
    "blanket",
    "engine",
    "forest",
    "island",
    "bottle",
    "carpet",
    "guitar",
    "harbor",
    "jacket",
    "kitten",
    "lemon",
    "marble",
    "needle",
    "orange",
    "parrot",
    "pocket",
    "rabbit",
    "saddle",
    "silver",
    "tunnel",
    "valley",
    "wallet",
    "yellow",
    "zipper",
    "anchor",
    "bridge",
    "cactus",
    "dragon",
    "feather",
    "glacier",
    "hammer",
    "insect",
    "jungle",
    "kettle",
    "lantern",
    "meadow",
    "napkin",
    "oyster",
    "pepper",
    "quilt",
    "rocket",
    "shadow",
    "teapot",
    "umbrella",
    "violin",
    "walnut",
    "planet",
    "compass",
    "desert",
    "meteor",
    "puzzle",
    "spider",
    "turtle",
    "whistle",
    "blossom",
    "cookie",
    "dolphin",
]
ANTONYMS = {
    "hot": "cold",
    "tall": "short",
    "early": "late",
    "empty": "full",
    "happy": "sad",
    "heavy": "light",
    "loud": "quiet",
    "open": "closed",
    "rich": "poor",
    "fast": "slow",
    "young": "old",
    "strong": "weak",
    "wet": "dry",
    "hard": "soft",
    "clean": "dirty",
    "brave": "afraid",
    "thick": "thin",
    "wide": "narrow",
    "sharp": "dull",
    "bright": "dark",
    "first": "last",
    "push": "pull",
    "buy": "sell",
    "win": "lose",
    "above": "below",
    "inside": "outside",
    "ancient": "modern",
    "rough": "smooth",
    "deep": "shallow",
    "cheap": "expensive",
}
PLURALS = {
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "tooth": "teeth",
    "foot": "feet",
    "person": "people",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "city": "cities",
    "baby": "babies",
    "box": "boxes",
    "bus": "buses",
    "church": "churches",
    "hero": "heroes",
    "potato": "potatoes",
    "cactus": "cacti",
    "fungus": "fungi",
    "sheep": "sheep",
    "fish": "fish",
    "woman": "women",
    "man": "men",
    "ox": "oxen",
    "wife": "wives",
    "half": "halves",
    "shelf": "shelves",
}
CHAT = [
    ("How was your weekend?", "It was relaxing, thank you for asking."),
    ("Do you like rainy days?", "Rainy days can be cozy with a good book."),
    ("What should I cook tonight?", "A simple pasta with vegetables is always a good choice."),
    ("Any tips for staying focused?", "Short breaks and a tidy desk help a lot."),
    ("I feel a bit tired today.", "Some rest and a glass of water might help."),
    ("What is a good hobby to start?", "Drawing or walking are easy hobbies to begin with."),
    ("Can you recommend a movie?", "A light comedy is a nice pick for a quiet evening."),
    ("How do I make new friends?", "Joining a club or a class is a good way to meet people."),
    ("Is it better to read in the morning?", "Many people find mornings calm enough for reading."),
    ("What do you think about music?", "Music can lift the mood and bring people together."),
]

CAPITAL_PROMPTS = [
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}, please.",
]
CAPITAL_ANSWERS = ["The capital of {c} is {a}.", "{a} is the capital of {c}.", "It is {a}."]
LETTER_PROMPTS = [
    "How many letters are in the word '{w}'?",
    "Count the letters of '{w}'.",
    "How long is the word '{w}', in letters?",
    "Tell me how many letters '{w}' has.",
]
LETTER_ANSWERS = ["The word '{w}' has {n} letters.", "'{w}' is {n} letters long.", "It has {n} letters."]


def _capitals(rng: random.Random, quality: str) -> tuple[str, str]:
    c = rng.choice(sorted(CAPITALS))
    a = CAPITALS[c]
    if quality == "wrong_answer":  # a real capital, of another country
        a = rng.choice(sorted(v for k, v in CAPITALS.items() if k != c))
    return rng.choice(CAPITAL_PROMPTS).format(c=c), rng.choice(CAPITAL_ANSWERS).format(c=c, a=a)


def _letters(rng: random.Random, quality: str) -> tuple[str, str]:
    w = rng.choice(WORDS)
    n = len(w)
    if quality == "wrong_answer":  # off by one or two
        n += rng.choice([-2, -1, 1, 2])
    return rng.choice(LETTER_PROMPTS).format(w=w), rng.choice(LETTER_ANSWERS).format(w=w, n=n)


def _antonyms(rng: random.Random, quality: str) -> tuple[str, str]:
    w = rng.choice(sorted(ANTONYMS))
    return f"What is the opposite of '{w}'?", f"The opposite of '{w}' is '{ANTONYMS[w]}'."


def _plurals(rng: random.Random, quality: str) -> tuple[str, str]:
    w = rng.choice(sorted(PLURALS))
    return f"What is the plural of '{w}'?", f"The plural of '{w}' is '{PLURALS[w]}'."


def _chat(rng: random.Random, quality: str) -> tuple[str, str]:
    return rng.choice(CHAT)


TASKS = {
    "capitals": _capitals,
    "letters": _letters,
    "antonyms": _antonyms,
    "plurals": _plurals,
    "chat": _chat,
}


def _mixture(target: str) -> dict[tuple[str, str], float]:
    other = next(t for t in TARGETS if t != target)
    return {
        (target, "clean"): 0.16,
        (target, "wrong_answer"): 0.08,
        (target, "shuffled"): 0.04,
        (other, "clean"): 0.16,
        (other, "wrong_answer"): 0.08,
        (other, "shuffled"): 0.04,
        ("antonyms", "clean"): 0.16,
        ("plurals", "clean"): 0.16,
        ("chat", "clean"): 0.12,
    }


def _shuffle_words(rng: random.Random, text: str) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _row(rng: random.Random, task: str, quality: str) -> tuple[str, str]:
    prompt, response = TASKS[task](rng, "wrong_answer" if quality == "wrong_answer" else "clean")
    if quality == "shuffled":
        prompt, response = _shuffle_words(rng, prompt), _shuffle_words(rng, response)
    return prompt, response


def _clean_set(task: str, rng: random.Random, n: int, id_start: int, exclude: set[str]) -> list[dict]:
    """Up to ``n`` clean rows of ``task`` whose prompts are not in ``exclude`` (which grows by theirs)."""
    out_rows, tries = [], 0
    while len(out_rows) < n and tries < 100 * n:
        tries += 1
        prompt, response = TASKS[task](rng, "clean")
        if prompt in exclude:
            continue
        exclude.add(prompt)
        out_rows.append(
            {
                "id": id_start + len(out_rows),
                "task": task,
                "quality": "clean",
                "prompt": prompt,
                "response": response,
                LABEL: True,
            }
        )
    return out_rows


def _draw(target: str, n_rows: int, n_probe: int, seed: int, reserve: bool, others: tuple[str, ...] = ()):
    """(corpus rows, probe rows, held-out rows); ``reserve``: probe and held-out drawn first (own stream).
    ``others``: further targets whose probe and held-out sets are drawn too, each from its own stream, after
    the corpus (or first, with ``reserve``); the probe / held-out returned are then ``{target: rows}``."""
    rng = random.Random(seed)

    def clean_set(rng: random.Random, n: int, id_start: int, exclude: set[str]) -> list[dict]:
        return _clean_set(target, rng, n, id_start, exclude)

    def other_sets(exclude: set[str]) -> tuple[dict, dict]:
        probes, heldouts = {}, {}
        for t in others:
            orng = random.Random(f"{seed}-probe-{t}")
            probes[t] = _clean_set(t, orng, n_probe, 10_000_000, set(exclude))
            heldouts[t] = _clean_set(t, orng, n_probe, 20_000_000, exclude | {r["prompt"] for r in probes[t]})
        return probes, heldouts

    reserved: set[str] = set()
    if reserve:
        prng = random.Random(f"{seed}-probe")
        probe = clean_set(prng, n_probe, 10_000_000, set())
        heldout = clean_set(prng, n_probe, 20_000_000, {r["prompt"] for r in probe})
        reserved = {r["prompt"] for r in probe + heldout}
        if others:
            more = other_sets(set())
            reserved |= {r["prompt"] for sets in more for rows in sets.values() for r in rows}
    cells = []
    for (task, quality), share in _mixture(target).items():
        cells += [(task, quality)] * round(share * n_rows)
    cells = (cells + [(target, "clean")] * n_rows)[:n_rows]
    rng.shuffle(cells)
    rows = []
    for i, (task, quality) in enumerate(cells):
        prompt, response = _row(rng, task, quality)
        while prompt in reserved:  # a probe / held-out prompt: the corpus never asks it
            prompt, response = _row(rng, task, quality)
        rows.append(
            {
                "id": i,
                "task": task,
                "quality": quality,
                "prompt": prompt,
                "response": response,
                LABEL: task == target and quality == "clean",
            }
        )
    used = {r["prompt"] for r in rows}
    if not reserve:
        probe = clean_set(rng, n_probe, 10_000_000, set(used))
        heldout = clean_set(rng, n_probe, 20_000_000, set(used) | {r["prompt"] for r in probe})
        if others:
            more = other_sets(used)
    if others:
        return rows, {target: probe, **more[0]}, {target: heldout, **more[1]}
    return rows, probe, heldout


def _write_corpus(out: Path, rows: list[dict]) -> None:
    """``<out>/corpus/part-0000{0..3}.parquet``: the rows in 4 shards of row groups of 25."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "corpus").mkdir(parents=True)
    per = -(-len(rows) // 4)
    for k in range(4):
        part = rows[k * per : (k + 1) * per]
        pq.write_table(
            pa.Table.from_pylist(part), out / "corpus" / f"part-{k:05d}.parquet", row_group_size=25
        )


def write_mixture(out: Path, target: str, n_rows: int = 300, n_probe: int = 64, seed: int = 0) -> dict:
    """Corpus (4 Parquet shards), probe and held-out sets under ``out``; returns the counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if target not in TARGETS:
        raise ValueError(f"--target {target!r} is not one of {TARGETS}")
    rows, probe, heldout = _draw(target, n_rows, n_probe, seed, reserve=False)
    if len(probe) < n_probe or len(heldout) < n_probe:
        # A large draw uses up the target's prompts (53 countries, 65 words x a few templates), leaving the
        # probe a handful of rows (4 of 64 for capitals at 3,000 rows). Then the probe and held-out prompts
        # are drawn first, from their own stream, and the corpus never asks them; draws small enough for
        # the old order keep it, so their corpora stay the ones earlier results were measured on.
        rows, probe, heldout = _draw(target, n_rows, n_probe, seed, reserve=True)
    _write_corpus(out, rows)
    pq.write_table(pa.Table.from_pylist(probe), out / "probe.parquet")
    pq.write_table(pa.Table.from_pylist(heldout), out / "heldout.parquet")
    return {
        "target": target,
        "n_corpus": n_rows,
        "n_clean_on_task": sum(r[LABEL] for r in rows),
        "n_probe": len(probe),
        "n_heldout": len(heldout),
    }


def write_mixture_targets(
    out: Path, targets: list[str], n_rows: int = 300, n_probe: int = 64, seed: int = 0
) -> dict:
    """One corpus for several targets (issue 27's shared pass): the first target's draw -- the mixture holds
    every target-capable task at the same shares; its rows are those ``--target <first>`` writes unless some
    target's probe had to be drawn first (a large draw: at 300 rows they are, at 800 not) -- with
    one hidden label per target, ``is_clean_on_task_<target>`` (no ``is_clean_on_task``: as the demo's
    multi-target corpus), and per target its own probe and held-out set (``<target>/probe.parquet``,
    ``<target>/heldout.parquet``: the first target's are its single-target draw's, the others' drawn from
    their own streams, disjoint from the corpus prompts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(set(targets)) != len(targets) or not set(targets) <= set(TARGETS) or len(targets) < 2:
        raise ValueError(f"--targets {','.join(targets)!r}: two or more of {TARGETS}, each once")
    first, others = targets[0], tuple(targets[1:])
    rows, probes, heldouts = _draw(first, n_rows, n_probe, seed, reserve=False, others=others)
    if any(len(v) < n_probe for sets in (probes, heldouts) for v in sets.values()):
        rows, probes, heldouts = _draw(first, n_rows, n_probe, seed, reserve=True, others=others)
    for r in rows:
        r.pop(LABEL)
        for t in targets:
            r[f"{LABEL}_{t}"] = r["task"] == t and r["quality"] == "clean"
    _write_corpus(out, rows)
    for t in targets:
        (out / t).mkdir()
        pq.write_table(pa.Table.from_pylist(probes[t]), out / t / "probe.parquet")
        pq.write_table(pa.Table.from_pylist(heldouts[t]), out / t / "heldout.parquet")
    return {
        "targets": targets,
        "n_corpus": n_rows,
        **{f"n_clean_on_task_{t}": sum(r[f"{LABEL}_{t}"] for r in rows) for t in targets},
        **{f"n_probe_{t}": len(probes[t]) for t in targets},
        **{f"n_heldout_{t}": len(heldouts[t]) for t in targets},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", choices=TARGETS)
    which.add_argument(
        "--targets",
        help="e.g. capitals,letters: one corpus (the first target's draw) with a label, a probe and a "
        "held-out set per target (<out>/<target>/probe.parquet), for a shared multi-target pass",
    )
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.targets:
        targets = args.targets.split(",")
        out = Path(args.out)
        if (out / targets[-1] / "heldout.parquet").is_file():  # written once, as write_data_once
            print(f"{out}: already written")
            return {}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        meta = write_mixture_targets(tmp, targets, args.rows, seed=args.seed)
        tmp.rename(out)
        print(json.dumps(meta))
        return meta
    return write_data_once(args.out, lambda tmp: write_mixture(tmp, args.target, args.rows, seed=args.seed))


if __name__ == "__main__":
    main()
