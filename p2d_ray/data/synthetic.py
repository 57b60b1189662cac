"""The offline demo corpus: a deterministic, seeded synthetic multi-task mixture in Parquet.

The target task is ``arithmetic``: GSM8K-style word problems whose worked solution ends ``#### <answer>``.
Around it sit other on-distribution tasks (dialogue -> summary, instruction -> answer) and low-quality rows
(arithmetic with wrong answers, word-shuffled text, off-task noise). ``is_clean_on_task`` (task is
arithmetic AND quality is clean) is a hidden label for evaluating a selection, never an input to it.

``demo_assets()`` builds the corpus (8 shards x 5 row groups, so scoring can split work by file and row
group), a 100-row probe set and a 500-row held-out set once under ``$P2D_RAY_CACHE/demo/data``, and returns
the cached paths afterwards. :func:`build_once` (also used for the demo model) builds into a temporary
directory under a file lock and renames it into place, so concurrent callers never see half-written files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Bump when the generator or the file layout changes: a cached build with another version is rebuilt.
RECIPE_VERSION = 2
N_CORPUS = 20_000
N_SHARDS = 8
ROW_GROUP_SIZE = 500  # 2,500 rows per shard -> 5 row groups each
N_PROBE, N_HELDOUT = 100, 500
CORPUS_SEED, PROBE_SEED, HELDOUT_SEED = 0, 1, 2
# Probe and held-out ids live in their own ranges, disjoint from the corpus ids 0 .. n_rows-1.
PROBE_ID_START, HELDOUT_ID_START = 10_000_000, 20_000_000

TARGET_TASK = "arithmetic"
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("quality", pa.string()),
        ("is_clean_on_task", pa.bool_()),
    ]
)

# (task, quality) -> share of the corpus. 20% clean arithmetic: a top-10% selection can be all clean.
MIXTURE = {
    ("arithmetic", "clean"): 0.20,
    ("arithmetic", "wrong_answer"): 0.10,
    ("arithmetic", "shuffled"): 0.05,
    ("dialogue", "clean"): 0.17,
    ("dialogue", "shuffled"): 0.05,
    ("instruction", "clean"): 0.18,
    ("instruction", "wrong_answer"): 0.05,
    ("instruction", "shuffled"): 0.05,
    ("noise", "noise"): 0.15,
}

# fmt: off
NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Emma", "Jack", "Nina", "Omar", "Ravi",
         "Sara", "Yuki", "Ivan", "Lena", "Paul", "Rosa"]
ITEMS = ["apples", "pencils", "cookies", "marbles", "books", "stickers", "cards", "eggs", "shells", "coins",
         "flowers", "toys"]
EVENTS = ["party", "picnic", "concert", "game", "meeting", "dinner", "movie", "race"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FOODS = ["cake", "juice", "bread", "salad", "fruit", "pizza", "cookies", "soup"]
# (what the speaker says, how the summary says it)
CHORES = [("work late", "work late"), ("study for a test", "study for a test"), ("visit my aunt", "visit an aunt"),
          ("fix my bike", "fix a bike"), ("clean the house", "clean the house"), ("walk the dog", "walk the dog")]
OBJECTS = ["bike", "umbrella", "book", "camera", "laptop", "ladder", "tent", "guitar"]
WHENS = ["tomorrow", "tonight", "on Monday", "after lunch", "this evening", "next week"]
PLACES = ["hall", "park", "garden", "library", "gym", "cafe"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "candle", "garden", "window", "pencil", "rocket",
         "forest", "silver", "planet", "dragon", "castle", "button", "orange", "mirror", "jacket", "honey", "ocean",
         "violin", "pepper", "rabbit", "summer", "winter", "bottle", "ladder", "magnet"]
# fmt: on
NOISE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#@$%&*+=/?!;:~"


# --------------------------------------------------------------------------------------------- arithmetic
# A solution is a chain of steps (a, op, b, result); the response prints each step and the final answer.
Step = tuple[int, str, int, int]


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _word_problem(rng: random.Random) -> tuple[str, list[Step]]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = f"{name} has {a} boxes of {b} {item} and gives away {c}. How many {item} are left?"
        return q, [(a, "*", b, a * b), (a * b, "-", c, a * b - c)]
    if kind == 1:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = f"{name} buys {a} {item} and then {b} more. How many {item} does {name} have now?"
        return q, [(a, "+", b, a + b)]
    if kind == 2:
        b, r = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} shares {b * r} {item} equally among {b} friends. How many {item} does each friend get?"
        return q, [(b * r, "/", b, r)]
    if kind == 3:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b + rng.randint(1, 30)
        q = f"One of the {item} costs {a} dollars. {name} buys {b} and pays {c} dollars. How much change is due?"
        return q, [(a, "*", b, a * b), (c, "-", a * b, c - a * b)]
    if kind == 4:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
        q = f"{name} reads {a} pages a day for {b} days, then {c} more pages. How many pages is that in total?"
        return q, [(a, "*", b, a * b), (a * b, "+", c, a * b + c)]
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    c = rng.randint(1, 30)
    q = f"{name} had {a} {item}, lost {b} and then found {c}. How many {item} does {name} have?"
    return q, [(a, "-", b, a - b), (a - b, "+", c, a - b + c)]


def _corrupt(rng: random.Random, steps: list[Step]) -> tuple[list[Step], int]:
    """A wrong worked solution: one step's result is off and later steps carry the error forward,
    or every step is right but the final ``####`` answer is not the last result."""
    if rng.random() < 0.3:
        return steps, steps[-1][3] + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    i = rng.randrange(len(steps))
    out = list(steps[:i])
    a, op, b, r = steps[i]
    out.append((a, op, b, r + rng.choice([-3, -2, -1, 1, 2, 3, 10])))
    for (a, op, b, _), (_, _, _, right_prev) in zip(steps[i + 1 :], steps[i:], strict=False):
        # A later step uses the previous result as one operand: carry the wrong value forward.
        if a == right_prev:
            a = out[-1][3]
        else:
            b = out[-1][3]
        out.append((a, op, b, _apply(a, op, b)))
    return out, out[-1][3]


def _solution(steps: list[Step], answer: int) -> str:
    return " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in steps) + f" #### {answer}"


def _arithmetic(rng: random.Random, wrong: bool = False) -> tuple[str, str]:
    q, steps = _word_problem(rng)
    answer = steps[-1][3]
    if wrong:
        steps, answer = _corrupt(rng, steps)
    return q + "\n", _solution(steps, answer)


# ------------------------------------------------------------------------------ other on-distribution tasks
def _dialogue(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    kind = rng.randrange(4)
    if kind == 0:
        ev, day, food = rng.choice(EVENTS), rng.choice(DAYS), rng.choice(FOODS)
        d = f"{a}: Are you coming to the {ev} on {day}?\n{b}: Yes, I will bring {food}."
        s = f"{b} will come to the {ev} on {day} and bring {food}."
    elif kind == 1:
        ev, day, chore = rng.choice(EVENTS), rng.choice(DAYS), rng.choice(CHORES)
        d = f"{a}: Are you coming to the {ev} on {day}?\n{b}: No, I have to {chore[0]}."
        s = f"{b} will miss the {ev} on {day} to {chore[1]}."
    elif kind == 2:
        obj, when = rng.choice(OBJECTS), rng.choice(WHENS)
        d = f"{a}: Can you lend me your {obj}?\n{b}: Sure, I will give it to you {when}."
        s = f"{b} will lend {a} the {obj} {when}."
    else:
        ev, place, hour = rng.choice(EVENTS), rng.choice(PLACES), rng.randint(1, 12)
        d = f"{a}: What time does the {ev} start?\n{b}: It starts at {hour} pm in the {place}."
        s = f"The {ev} starts at {hour} pm in the {place}."
    return f"Summarize the dialogue.\n{d}\n", s


def _instruction(rng: random.Random, wrong: bool = False) -> tuple[str, str]:
    kind = rng.randrange(7)
    w = rng.choice(WORDS)
    nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 5))]
    items = rng.sample(WORDS, rng.randint(3, 5))
    if kind == 0:
        p, r = f"Reverse the word: {w}", w[::-1]
    elif kind == 1:
        p, r = f"Write the word in capitals: {w}", w.upper()
    elif kind == 2:
        p, r = f"Sort the letters of: {w}", "".join(sorted(w))
    elif kind == 3:
        p, r = f"Sort the list: {', '.join(map(str, nums))}", ", ".join(map(str, sorted(nums)))
    elif kind == 4:
        p, r = f"Largest number in: {', '.join(map(str, nums))}", str(max(nums))
    elif kind == 5:
        p, r = f"Last item of: {', '.join(items)}", items[-1]
    else:
        p, r = f"Count the letters in: {w}", str(len(w))
    if wrong:
        r = _wrong_text(rng, r)
    return p + "\n", r


def _wrong_text(rng: random.Random, right: str) -> str:
    """A plausible but wrong answer: a number off by a little, else a permutation that differs."""
    if right.isdigit():
        return str(int(right) + rng.choice([-2, -1, 1, 2, 5]))
    parts = right.split(", ") if ", " in right else list(right)
    sep = ", " if ", " in right else ""
    for _ in range(20):
        rng.shuffle(parts)
        if sep.join(parts) != right:
            return sep.join(parts)
    return right + sep + parts[0]  # every permutation equal (e.g. "ooo"): still wrong


# ---------------------------------------------------------------------------------------- low quality
def _shuffle_words(rng: random.Random, text: str) -> str:
    """The words of ``text`` in another order (the characters, for a one-word text)."""
    words, sep = text.split(), " "
    if len(words) == 1:
        words, sep = list(words[0]), ""
    for _ in range(10):  # retry: a short text can shuffle back into its own order
        rng.shuffle(words)
        if sep.join(words) != text.strip():
            break
    return sep.join(words)


def _noise(rng: random.Random) -> tuple[str, str]:
    vocab = WORDS + ITEMS + NAMES + EVENTS
    prompt = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12)))
    resp = "".join(rng.choice(NOISE_CHARS + "  ") for _ in range(rng.randint(10, 60))).strip() or "x"
    return prompt + "\n", resp


def _row(rng: random.Random, task: str, quality: str) -> tuple[str, str]:
    if task == "noise":
        return _noise(rng)
    wrong = quality == "wrong_answer"
    prompt, resp = {
        "arithmetic": lambda: _arithmetic(rng, wrong),
        "dialogue": lambda: _dialogue(rng),
        "instruction": lambda: _instruction(rng, wrong),
    }[task]()
    if quality == "shuffled":
        prompt, resp = _shuffle_words(rng, prompt) + "\n", _shuffle_words(rng, resp)
    return prompt, resp


def _table(ids, tasks, prompts, responses, qualities) -> pa.Table:
    clean = [t == TARGET_TASK and q == "clean" for t, q in zip(tasks, qualities, strict=True)]
    return pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), tasks, prompts, responses, qualities, pa.array(clean, pa.bool_())],
        schema=SCHEMA,
    )


def generate_corpus(n_rows: int = N_CORPUS, seed: int = CORPUS_SEED, id_start: int = 0) -> pa.Table:
    """The mixed corpus: exactly ``round(share * n_rows)`` rows of each (task, quality) in :data:`MIXTURE`
    (rounding remainder to the first), in a seeded random order, ids ``id_start ..``. Deterministic in
    (n_rows, seed).

    Raises:
        ValueError: n_rows < 1.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    rng = random.Random(seed)
    counts = {k: round(share * n_rows) for k, share in MIXTURE.items()}
    first = next(iter(counts))
    counts[first] += n_rows - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    prompts, responses = zip(*(_row(rng, t, q) for t, q in kinds), strict=True)
    tasks, qualities = zip(*kinds, strict=True)
    return _table(range(id_start, id_start + n_rows), tasks, prompts, responses, qualities)


def generate_arithmetic(
    n_rows: int, seed: int, id_start: int, exclude_prompts: Iterable[str] = ()
) -> pa.Table:
    """``n_rows`` clean arithmetic rows with distinct prompts, none of them in ``exclude_prompts``
    (so a probe or held-out set never repeats a corpus question)."""
    rng = random.Random(seed)
    seen = set(exclude_prompts)
    prompts, responses = [], []
    for _ in range(100 * n_rows):
        if len(prompts) == n_rows:
            break
        p, r = _arithmetic(rng)
        if p not in seen:
            seen.add(p)
            prompts.append(p)
            responses.append(r)
    else:
        raise RuntimeError(f"could not draw {n_rows} distinct arithmetic prompts")
    n = len(prompts)
    return _table(range(id_start, id_start + n), [TARGET_TASK] * n, prompts, responses, ["clean"] * n)


def generate_probe(exclude_prompts: Iterable[str] = (), n_rows: int = N_PROBE, seed: int = PROBE_SEED):
    return generate_arithmetic(n_rows, seed, PROBE_ID_START, exclude_prompts)


def generate_heldout(exclude_prompts: Iterable[str] = (), n_rows: int = N_HELDOUT, seed: int = HELDOUT_SEED):
    return generate_arithmetic(n_rows, seed, HELDOUT_ID_START, exclude_prompts)


# ------------------------------------------------------------------------------------- build once, cached
def cache_root() -> Path:
    """``$P2D_RAY_CACHE`` (the Makefile points it at ``.cache/p2d-ray`` in the repo), else ``~/.cache/p2d-ray``."""
    return Path(os.environ.get("P2D_RAY_CACHE") or Path.home() / ".cache" / "p2d-ray")


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _is_built(target: Path, digest: str) -> bool:
    try:
        return json.loads((target / "meta.json").read_text()).get("recipe_hash") == digest
    except (OSError, ValueError):
        return False


@contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (blocks until free; released when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, recipe: dict, build: Callable[[Path], dict | None]) -> Path:
    """Make ``target`` hold the output of ``build(tmp_dir)`` for ``recipe``, building at most once.

    Fast path: ``target/meta.json`` records the same recipe hash -> return. Otherwise, under the lock
    ``<target>.lock``: check again (another process may have just built it), build into a temporary
    sibling directory, write ``meta.json`` (recipe, its hash, and whatever dict ``build`` returned), and
    rename it over ``target``. A stale build (other recipe) is replaced; a crashed build leaves only a
    temporary directory that the next build removes.
    """
    target = Path(target)
    digest = recipe_hash(recipe)
    if _is_built(target, digest):
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if _is_built(target, digest):
            return target
        tmp = target.with_name(f".{target.name}.tmp")
        old = target.with_name(f".{target.name}.old")
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        info = build(tmp) or {}
        meta = {"recipe_hash": digest, "recipe": recipe, **info}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    corpus_dir: Path  # N_SHARDS Parquet files, several row groups each
    probe_path: Path  # 100 clean arithmetic rows
    heldout_path: Path  # 500 clean arithmetic rows, for evaluation


DATA_RECIPE = {
    "version": RECIPE_VERSION,
    "n_corpus": N_CORPUS,
    "n_shards": N_SHARDS,
    "row_group_size": ROW_GROUP_SIZE,
    "seeds": [CORPUS_SEED, PROBE_SEED, HELDOUT_SEED],
    "n_probe": N_PROBE,
    "n_heldout": N_HELDOUT,
}


def write_demo_data(out: Path) -> dict:
    """Write the corpus shards, probe and held-out sets under ``out``; returns counts for meta.json."""
    corpus = generate_corpus(N_CORPUS, CORPUS_SEED)
    (out / "corpus").mkdir(parents=True)
    per_shard = -(-corpus.num_rows // N_SHARDS)
    for i in range(N_SHARDS):
        shard = corpus.slice(i * per_shard, per_shard)
        pq.write_table(shard, out / "corpus" / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP_SIZE)
    used = corpus.column("prompt").to_pylist()
    probe = generate_probe(used)
    heldout = generate_heldout(used + probe.column("prompt").to_pylist())
    pq.write_table(probe, out / "probe.parquet")
    pq.write_table(heldout, out / "heldout.parquet")
    n_clean = sum(corpus.column("is_clean_on_task").to_pylist())
    return {
        "n_corpus": corpus.num_rows,
        "n_clean_on_task": n_clean,
        "n_probe": probe.num_rows,
        "n_heldout": heldout.num_rows,
    }


def demo_assets(cache_dir: str | Path | None = None) -> DemoAssets:
    """Paths of the demo corpus, probe and held-out sets, built on first use under
    ``<cache>/demo/data`` (``cache`` = ``cache_dir`` or :func:`cache_root`)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    data = build_once(root / "demo" / "data", DATA_RECIPE, write_demo_data)
    return DemoAssets(data, data / "corpus", data / "probe.parquet", data / "heldout.parquet")
