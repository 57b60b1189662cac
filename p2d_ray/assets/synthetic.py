"""The offline demo corpus: a deterministic, seeded multi-task mixture in Parquet, with a hidden label.

Tasks (the ``task`` column), each in several phrasings:

- ``arithmetic``: one- or two-step word problems; the response is a worked solution ``a op b = r.`` that
  ends ``#### <answer>`` (GSM8K style);
- ``units``: unit conversions and everyday rates ("How many minutes are in 3 hours?"), same answer format;
- ``instruction``: short instructions (reverse a word, sort a list, largest number, count items, ...),
  some of them answered in the same ``#### <n>`` format;
- ``dialogue``: a two-line dialogue and its one-sentence summary;
- ``noise``: word salad prompts with random-character (sometimes ``#### n``) responses.

Low-quality variants (the ``quality`` column) sit next to the clean rows of every task: ``wrong_answer``
(same templates, a plausible wrong result: an off-by-a-little step carried forward, a wrong conversion
factor, a wrong final number) and ``shuffled`` (the words of prompt and response in random order). No
surface feature separates clean on-task rows from the rest: the answer format, the vocabulary and the row
lengths are shared across tasks and qualities; telling them apart takes knowing the task.

Either ``arithmetic`` or ``units`` can be the *target* task (:data:`TARGETS`): the probe and held-out sets
are clean rows of the target, and the hidden label ``is_clean_on_task`` (task is the target AND quality is
clean) is relative to it. The label is for evaluating a selection (``report/precision.py``), never an
input to it.

``demo_assets(target)`` builds the corpus (:data:`N_SHARDS` shards, several row groups each, so scoring can
split work by file and row group), the probe and the held-out set once under
``$P2D_RAY_CACHE/demo/data-<target>`` and returns the cached paths afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from p2d_ray.assets.cache import build_once, cache_root

# Bump when the generator or the file layout changes: a cached build with another version is rebuilt.
RECIPE_VERSION = 3
# Sized for SmolLM2-135M on 2 CPU cores (``make demo`` in <= 10 min, BENCHMARKS.md): two scoring passes
# (P2D and the random-heads control) over the corpus dominate the demo's time.
N_CORPUS = 300
N_SHARDS = 4
ROW_GROUP_SIZE = 25  # 75 rows per shard -> 3 row groups each
N_PROBE, N_HELDOUT = 64, 200
CORPUS_SEED, PROBE_SEED, HELDOUT_SEED = 0, 1, 2
# Probe and held-out ids live in their own ranges, disjoint from the corpus ids 0 .. n_rows-1.
PROBE_ID_START, HELDOUT_ID_START = 10_000_000, 20_000_000

TARGETS = ("arithmetic", "units")  # task families that can be the target (probe + held-out set each)
DEFAULT_TARGET = "arithmetic"
LABEL = "is_clean_on_task"
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("quality", pa.string()),
        (LABEL, pa.bool_()),
    ]
)

# (task, quality) -> share of the corpus. 16% clean rows of either target: a top-10% selection can be all
# clean, and the other target's rows are a same-format distractor of the same size.
MIXTURE = {
    ("arithmetic", "clean"): 0.16,
    ("arithmetic", "wrong_answer"): 0.08,
    ("arithmetic", "shuffled"): 0.04,
    ("units", "clean"): 0.16,
    ("units", "wrong_answer"): 0.08,
    ("units", "shuffled"): 0.04,
    ("instruction", "clean"): 0.12,
    ("instruction", "wrong_answer"): 0.04,
    ("instruction", "shuffled"): 0.04,
    ("dialogue", "clean"): 0.12,
    ("dialogue", "shuffled"): 0.04,
    ("noise", "noise"): 0.08,
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
# (larger unit, smaller unit, how many smaller in one larger): everyday facts a small model may know.
UNITS = [("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
         ("years", "months", 12), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("feet", "inches", 12), ("dozens", "items", 12), ("liters", "milliliters", 1000)]
# fmt: on
NOISE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#@$%&*+=/?!;:~"
# How a numeric task asks for its answer format (shared by arithmetic, units and numeric instructions).
FORMAT_HINTS = [
    " End with #### and the number.",
    " Give the final answer after ####.",
    " Answer with the steps, then #### and the result.",
]
OFF_BY = [-3, -2, -1, 1, 2, 3, 10]


# --------------------------------------------------------------------------------------------- arithmetic
# A solution is a chain of steps (a, op, b, result); the response prints each step and the final answer.
Step = tuple[int, str, int, int]


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _word_problem(rng: random.Random) -> tuple[str, list[Step]]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice([0, 0, 1, 1, 2, 3, 4, 5])  # mostly one step: a 135M model can do some of those
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 30)
        q = rng.choice(
            [
                f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                f"There are {a} {item} in a bag. {name} adds {b}. How many are in the bag?",
            ]
        )
        return q, [(a, "+", b, a + b)]
    if kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = rng.choice(
            [
                f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
                f"A shop has {a} {item} and sells {b}. How many {item} remain?",
            ]
        )
        return q, [(a, "-", b, a - b)]
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = rng.choice(
            [
                f"{name} has {a} boxes with {b} {item} in each. How many {item} in total?",
                f"Each of {a} friends brings {b} {item}. How many {item} do they bring?",
            ]
        )
        return q, [(a, "*", b, a * b)]
    if kind == 3:
        b, r = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} shares {b * r} {item} equally among {b} friends. How many {item} does each get?"
        return q, [(b * r, "/", b, r)]
    if kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = f"{name} has {a} bags of {b} {item} and gives away {c}. How many {item} are left?"
        return q, [(a, "*", b, a * b), (a * b, "-", c, a * b - c)]
    a, b, c = rng.randint(5, 30), rng.randint(2, 20), rng.randint(2, 20)
    q = f"{name} picks {a} {item}, then {b} more, then {c} more. How many {item} is that?"
    return q, [(a, "+", b, a + b), (a + b, "+", c, a + b + c)]


def _corrupt(rng: random.Random, steps: list[Step]) -> tuple[list[Step], int]:
    """A wrong worked solution: one step's result is off and later steps carry the error forward,
    or every step is right but the final ``####`` answer is not the last result."""
    if rng.random() < 0.3:
        return steps, steps[-1][3] + rng.choice(OFF_BY)
    i = rng.randrange(len(steps))
    out = list(steps[:i])
    a, op, b, r = steps[i]
    out.append((a, op, b, r + rng.choice(OFF_BY)))
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
    return q + rng.choice(FORMAT_HINTS), _solution(steps, answer)


# ------------------------------------------------------------------------------------------------- units
def _units(rng: random.Random, wrong: bool = False) -> tuple[str, str]:
    """A conversion from a larger to a smaller unit: one multiplication by a fact the model must know.
    Wrong answers use another unit's factor (a real confusion) or are off by a little."""
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    name = rng.choice(NAMES)
    q = rng.choice(
        [
            f"How many {small} are in {n} {big}?",
            f"Convert {n} {big} to {small}.",
            f"{name} waits {n} {big}. How many {small} is that?"
            if big in ("hours", "minutes", "days", "weeks")
            else f"Write {n} {big} in {small}.",
            f"What is {n} {big} in {small}?",
        ]
    )
    f = factor
    if wrong:
        others = sorted({u[2] for u in UNITS} - {factor})
        f = rng.choice(others) if rng.random() < 0.5 else factor
    answer = n * f
    if wrong and f == factor:
        answer += rng.choice(OFF_BY)
    return q + rng.choice(FORMAT_HINTS), f"{n} * {f} = {answer}. #### {answer}"


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
    head = rng.choice(["Summarize the dialogue.", "Summarize in one sentence.", "What did they agree?"])
    return f"{head}\n{d}", s


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
        p, r = f"Sort the list: {', '.join(map(str, nums))}", ", ".join(map(str, sorted(nums)))
    elif kind == 3:
        p, r = f"Last item of: {', '.join(items)}", items[-1]
    elif kind == 4:
        p, r = f"Largest number in: {', '.join(map(str, nums))}", str(max(nums))
    elif kind == 5:
        p, r = f"Count the items in: {', '.join(items)}", str(len(items))
    else:
        p, r = f"Smallest number in: {', '.join(map(str, nums))}", str(min(nums))
    if wrong:
        r = _wrong_text(rng, r)
    if kind >= 4:  # numeric answers share the arithmetic/units answer format
        return p + "." + rng.choice(FORMAT_HINTS), f"#### {r}"
    return p, r


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
    resp = "".join(rng.choice(NOISE_CHARS + "  ") for _ in range(rng.randint(8, 40))).strip() or "x"
    if rng.random() < 0.3:
        resp += f" #### {rng.randint(1, 500)}"
    return prompt, resp


ROW_MAKERS = {"arithmetic": _arithmetic, "units": _units, "instruction": _instruction}


def _row(rng: random.Random, task: str, quality: str) -> tuple[str, str]:
    """(prompt, response) of one row; every prompt ends with a newline, so prompt+response reads as text."""
    if task == "noise":
        prompt, resp = _noise(rng)
    elif task == "dialogue":
        prompt, resp = _dialogue(rng)
    else:
        prompt, resp = ROW_MAKERS[task](rng, quality == "wrong_answer")
    if quality == "shuffled":
        prompt, resp = _shuffle_words(rng, prompt), _shuffle_words(rng, resp)
    return prompt + "\n", resp


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"demo target {target!r} is not a demo task family; allowed: {list(TARGETS)}")
    return target


def _table(ids, tasks, prompts, responses, qualities, target: str) -> pa.Table:
    clean = [t == target and q == "clean" for t, q in zip(tasks, qualities, strict=True)]
    return pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), tasks, prompts, responses, qualities, pa.array(clean, pa.bool_())],
        schema=SCHEMA,
    )


def generate_corpus(
    n_rows: int = N_CORPUS, seed: int = CORPUS_SEED, id_start: int = 0, target: str = DEFAULT_TARGET
) -> pa.Table:
    """The mixed corpus: exactly ``round(share * n_rows)`` rows of each (task, quality) in :data:`MIXTURE`
    (rounding remainder to the first), in a seeded random order, ids ``id_start ..``. Deterministic in
    (n_rows, seed); ``target`` only decides the hidden label.

    Raises:
        ValueError: n_rows < 1, or an unknown target.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    check_target(target)
    rng = random.Random(seed)
    counts = {k: round(share * n_rows) for k, share in MIXTURE.items()}
    first = next(iter(counts))
    counts[first] += n_rows - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    prompts, responses = zip(*(_row(rng, t, q) for t, q in kinds), strict=True)
    tasks, qualities = zip(*kinds, strict=True)
    return _table(range(id_start, id_start + n_rows), tasks, prompts, responses, qualities, target)


def generate_task(
    task: str, n_rows: int, seed: int, id_start: int, exclude_prompts: Iterable[str] = ()
) -> pa.Table:
    """``n_rows`` clean rows of a target ``task`` with distinct prompts, none of them in ``exclude_prompts``
    (so a probe or held-out set never repeats a corpus question)."""
    check_target(task)
    rng = random.Random(seed)
    seen = set(exclude_prompts)
    prompts, responses = [], []
    for _ in range(100 * n_rows):
        if len(prompts) == n_rows:
            break
        p, r = _row(rng, task, "clean")
        if p not in seen:
            seen.add(p)
            prompts.append(p)
            responses.append(r)
    else:
        raise RuntimeError(f"could not draw {n_rows} distinct {task} prompts")
    n = len(prompts)
    return _table(range(id_start, id_start + n), [task] * n, prompts, responses, ["clean"] * n, task)


def generate_probe(
    exclude_prompts: Iterable[str] = (),
    n_rows: int = N_PROBE,
    seed: int = PROBE_SEED,
    target: str = DEFAULT_TARGET,
):
    return generate_task(target, n_rows, seed, PROBE_ID_START, exclude_prompts)


def generate_heldout(
    exclude_prompts: Iterable[str] = (),
    n_rows: int = N_HELDOUT,
    seed: int = HELDOUT_SEED,
    target: str = DEFAULT_TARGET,
):
    return generate_task(target, n_rows, seed, HELDOUT_ID_START, exclude_prompts)


# ------------------------------------------------------------------------------------------ cached files
@dataclass(frozen=True)
class DemoAssets:
    root: Path
    target: str
    corpus_dir: Path  # N_SHARDS Parquet files, several row groups each
    probe_path: Path  # N_PROBE clean rows of the target task
    heldout_path: Path  # N_HELDOUT clean rows of the target task, for evaluation


def data_recipe(target: str) -> dict:
    return {
        "version": RECIPE_VERSION,
        "target": target,
        "n_corpus": N_CORPUS,
        "n_shards": N_SHARDS,
        "row_group_size": ROW_GROUP_SIZE,
        "seeds": [CORPUS_SEED, PROBE_SEED, HELDOUT_SEED],
        "n_probe": N_PROBE,
        "n_heldout": N_HELDOUT,
    }


def write_demo_data(
    out: Path, target: str = DEFAULT_TARGET, seed_offset: int = 0, n_rows: int = N_CORPUS
) -> dict:
    """Write the corpus shards, probe and held-out sets under ``out``; returns counts for meta.json.
    ``seed_offset`` draws another corpus / probe / held-out set of the same mixture (the demo uses 0;
    ``benchmarks/selection_quality.py --corpus-seeds`` repeats a measurement over independent draws);
    ``n_rows`` a larger mixture of the same shares (``benchmarks/demo_draw.py``)."""
    corpus = generate_corpus(n_rows, CORPUS_SEED + seed_offset, target=target)
    (out / "corpus").mkdir(parents=True)
    per_shard = -(-corpus.num_rows // N_SHARDS)
    for i in range(N_SHARDS):
        shard = corpus.slice(i * per_shard, per_shard)
        pq.write_table(shard, out / "corpus" / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP_SIZE)
    used = corpus.column("prompt").to_pylist()
    probe = generate_probe(used, seed=PROBE_SEED + seed_offset, target=target)
    heldout = generate_heldout(
        used + probe.column("prompt").to_pylist(), seed=HELDOUT_SEED + seed_offset, target=target
    )
    pq.write_table(probe, out / "probe.parquet")
    pq.write_table(heldout, out / "heldout.parquet")
    return {
        "target": target,
        "n_corpus": corpus.num_rows,
        "n_clean_on_task": sum(corpus.column(LABEL).to_pylist()),
        "n_probe": probe.num_rows,
        "n_heldout": heldout.num_rows,
    }


def demo_assets(target: str = DEFAULT_TARGET, cache_dir: str | Path | None = None) -> DemoAssets:
    """Paths of the demo corpus, probe and held-out sets for ``target``, built on first use under
    ``<cache>/demo/data-<target>`` (``cache`` = ``cache_dir`` or :func:`cache_root`)."""
    check_target(target)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    data = build_once(
        root / "demo" / f"data-{target}", data_recipe(target), lambda tmp: write_demo_data(tmp, target)
    )
    return DemoAssets(data, target, data / "corpus", data / "probe.parquet", data / "heldout.parquet")


# ------------------------------------------------------------------------------ several targets at once
def label_column(target: str) -> str:
    """The hidden label of a multi-target demo corpus for ``target`` (``is_clean_on_task_<target>``)."""
    return f"{LABEL}_{check_target(target)}"


def write_targets_corpus(out: Path, targets: list[str], seed_offset: int = 0, n_rows: int = N_CORPUS) -> dict:
    """The demo corpus (the very rows and order of every single-target demo corpus of the same draw) with one
    hidden label per target, ``is_clean_on_task_<target>``, instead of the single ``is_clean_on_task``: a
    corpus for a run with several targets (``targets:``). Written as ``out/corpus``, the same shard layout."""
    corpus = generate_corpus(n_rows, CORPUS_SEED + seed_offset, target=targets[0]).drop_columns([LABEL])
    tasks, qualities = corpus.column("task").to_pylist(), corpus.column("quality").to_pylist()
    for t in targets:
        clean = [task == t and q == "clean" for task, q in zip(tasks, qualities, strict=True)]
        corpus = corpus.append_column(label_column(t), pa.array(clean, pa.bool_()))
    (out / "corpus").mkdir(parents=True)
    per_shard = -(-corpus.num_rows // N_SHARDS)
    for i in range(N_SHARDS):
        shard = corpus.slice(i * per_shard, per_shard)
        pq.write_table(shard, out / "corpus" / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP_SIZE)
    return {"targets": list(targets), "n_corpus": corpus.num_rows} | {
        f"n_{label_column(t)}": sum(corpus.column(label_column(t)).to_pylist()) for t in targets
    }


def demo_targets_corpus(targets: list[str], cache_dir: str | Path | None = None) -> Path:
    """The multi-target demo corpus directory for ``targets`` (built once under the cache); each target's
    probe and held-out set are its single-target demo's (:func:`demo_assets`), disjoint from these rows."""
    names = sorted({check_target(t) for t in targets})
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    recipe = {**data_recipe(names[0]), "target": None, "targets": names}
    data = build_once(
        root / "demo" / f"corpus-{'+'.join(names)}", recipe, lambda tmp: write_targets_corpus(tmp, names)
    )
    return data / "corpus"
