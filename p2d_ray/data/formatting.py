"""Rows -> token ids with a loss mask: plain text, prompt/response, chat template, and P2D's ICL prompt.

A row is encoded as ``prefix`` tokens (never scored: prompt, chat scaffolding, ICL demonstrations) followed
by ``target`` tokens (scored: the response, or the whole text for plain rows). ``loss_mask[t] = 1`` when
token ``t`` is a target token, i.e. its prediction from position ``t-1`` counts in the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from p2d_ray.config import DataConfig

FORMATS = ("plain", "prompt_response", "chat", "icl")


def resolve_format(cfg: DataConfig, columns: Sequence[str]) -> str:
    """``auto`` -> prompt_response if both prompt/response columns exist, else chat if a messages column
    exists, else plain. Checks columns."""
    cols = set(columns)
    has_pr = cfg.prompt_column in cols and cfg.response_column in cols
    has_msgs = cfg.messages_column in cols and not has_pr
    fmt = cfg.format
    if fmt == "auto":
        fmt = "prompt_response" if has_pr else "chat" if has_msgs else "plain"
    if has_msgs and fmt != "chat":
        raise ValueError(
            f"data.format={fmt} cannot read chat rows (column {cfg.messages_column!r}): use format chat or auto"
        )
    if fmt == "prompt_response" and not has_pr or fmt == "chat" and not (has_pr or has_msgs):
        need = f"{cfg.prompt_column!r} and {cfg.response_column!r}"
        need += f" (or {cfg.messages_column!r})" if fmt == "chat" else ""
        raise ValueError(f"data.format={fmt} needs columns {need}; found {sorted(cols)}")
    if fmt in ("plain", "icl") and not has_pr and cfg.text_column not in cols:
        raise ValueError(
            f"data.format={fmt} needs column {cfg.text_column!r} (or {cfg.prompt_column!r}+"
            f"{cfg.response_column!r}); found {sorted(cols)}"
        )
    return fmt


def task_format(cfg: DataConfig, columns: Sequence[str]) -> str:
    """The format a row is *trained, evaluated or probed* in. ``icl`` is a scoring device (probe
    demonstrations before each corpus row), not part of the task: such rows are used as prompt_response
    (or plain without those columns). Every other format is ``resolve_format``'s."""
    fmt = resolve_format(cfg, columns)
    if fmt == "icl":
        cols = set(columns)
        fmt = "prompt_response" if cfg.prompt_column in cols and cfg.response_column in cols else "plain"
    return fmt


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    @property
    def n_target(self) -> int:
        # Position 0 is never predicted, so it never counts.
        return int(sum(self.loss_mask[1:]))


def row_parts(row: dict, cfg: DataConfig) -> tuple[str, str]:
    """(prompt, target) text of a row; plain rows have an empty prompt, chat rows (``messages``) their turns
    before the last as ``role: content`` lines (:func:`row_chat` keeps them as messages). An Alpaca ``input``
    is appended to the prompt. Raises ValueError(reason) on bad values."""
    if cfg.prompt_column in row and cfg.response_column in row:
        prompt, response = row[cfg.prompt_column], row[cfg.response_column]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError("non_string")
        if not response.strip():
            raise ValueError("empty")
        extra = row.get(cfg.input_column)
        if extra is not None and not isinstance(extra, str):
            raise ValueError("non_string")
        if extra and extra.strip():  # Alpaca: instruction, then its input (most rows have an empty one)
            prompt = f"{prompt}\n\n{extra}" if prompt else extra
        return prompt, response
    if cfg.messages_column in row:
        turns, target = row_chat(row, cfg)
        return "".join(f"{m['role']}: {m['content']}\n" for m in turns), target
    text = row.get(cfg.text_column)
    if text is None:
        raise ValueError("null")
    if not isinstance(text, str):
        raise ValueError("non_string")
    if not text.strip():
        raise ValueError("empty")
    return "", text


def is_chat_row(row: dict, cfg: DataConfig) -> bool:
    """A row read from its ``messages`` (it has no prompt/response pair)."""
    return cfg.messages_column in row and not (cfg.prompt_column in row and cfg.response_column in row)


def row_chat(row: dict, cfg: DataConfig) -> tuple[list[dict], str]:
    """A chat row's ``messages`` (a list of ``{role, content}``, or that list as JSON text, as the scoring
    pipeline carries it): (the turns before the last, the last turn's content). The last turn must be the
    assistant's: it is the target. Raises ValueError(reason): ``null``, ``non_string`` (not a list of
    string role / content pairs, or a last turn that is not the assistant's), ``empty``."""
    import json

    value = row.get(cfg.messages_column)
    if value is None:
        raise ValueError("null")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("non_string") from None
    if not isinstance(value, list) or not value:
        raise ValueError("empty" if isinstance(value, list) else "non_string")
    turns = []
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError("non_string")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "assistant":
        raise ValueError("non_string")
    if not turns[-1]["content"].strip():
        raise ValueError("empty")
    return turns[:-1], turns[-1]["content"]


def icl_prefix(demos: Sequence[dict], cfg: DataConfig) -> str:
    """P2D's parameter-guided selection prompt: an instruction plus k probe-set demonstrations."""
    blocks = [cfg.icl_instruction]
    for d in demos:
        p, t = row_parts(d, cfg)
        blocks.append(f"{p}{t}" if p else t)
    return "\n\n".join(blocks) + "\n\n"


def chat_messages(prompt: str | list[dict], cfg: DataConfig) -> list[dict]:
    """The row's prompt as a chat: ``data.system_prompt`` (when set, and the turns have no system message of
    their own) then the user turn, or a chat row's own turns."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if cfg.system_prompt is None or (turns and turns[0]["role"] == "system"):
        return turns
    return [{"role": "system", "content": cfg.system_prompt}, *turns]


def encode_row(row: dict, tokenizer, cfg: DataConfig, fmt: str, demos: Sequence[dict] = ()) -> Encoded:
    """Encode one row. Raises ValueError(reason) for rows that belong in quarantine
    (``null``, ``empty``, ``non_string``, ``too_long``, ``no_target_tokens``)."""
    prompt, target = row_parts(row, cfg)
    if fmt == "chat":
        turns = row_chat(row, cfg)[0] if is_chat_row(row, cfg) else prompt
        prefix = tokenizer.apply_chat_template(
            chat_messages(turns, cfg), tokenize=False, add_generation_prompt=True
        )
    elif fmt == "icl":
        prefix = icl_prefix(demos, cfg) + prompt
    else:
        prefix = prompt
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    bos = tokenizer.bos_token_id
    if bos is not None and not (prefix_ids and prefix_ids[0] == bos):
        # One BOS per row: a chat template that opens with the BOS token (SmolLM2's `<|im_start|>`) has one.
        prefix_ids = [bos, *prefix_ids]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + eos
    ids = prefix_ids + target_ids
    mask = [0] * len(prefix_ids) + [1] * len(target_ids)
    truncated = False
    if len(ids) > cfg.max_length:
        if cfg.overlong == "quarantine":
            raise ValueError("too_long")
        ids, mask, truncated = ids[: cfg.max_length], mask[: cfg.max_length], True
    enc = Encoded(ids, mask, truncated)
    if enc.n_target == 0:
        raise ValueError("no_target_tokens")
    return enc


def added_bos(tokenizer, fmt: str) -> int | None:
    """The BOS id :func:`encode_row` puts in front of the row's own text, or None when it adds none (no BOS
    token, or a chat template whose text opens with it). ICL contexts strip exactly this token from each
    demonstration, keeping a template's own opening token."""
    bos = tokenizer.bos_token_id
    if bos is None or fmt != "chat":
        return bos
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return None if ids and ids[0] == bos else bos


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Returns input_ids / attention_mask / loss_mask, all ``[B, T]``."""
    T = max(len(e.input_ids) for e in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(e.loss_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


# -- probe / reference sets (Stage 1 and the probe gradient) ----------------------------------------
def encode_probe(rows: Sequence[dict], tokenizer, data: DataConfig) -> list[Encoded]:
    """Encode the probe rows, loss on target tokens only. A bad probe row is an error, never dropped."""
    if not rows:
        raise ValueError("the probe set is empty")
    # ICL demonstrations are drawn *from* the probe set to score the corpus; the probe rows themselves
    # are encoded as plain task samples.
    fmt = task_format(data, list(rows[0].keys()))
    encoded, bad = [], []
    for i, row in enumerate(rows):
        try:
            encoded.append(encode_row(row, tokenizer, data, fmt))
        except ValueError as err:
            bad.append(f"row {i}: {err}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ValueError(f"probe set has rows that cannot be used: {shown}")
    return encoded


def encode_reference(rows: Sequence[dict], tokenizer, data: DataConfig) -> list[Encoded]:
    """Encode general corpus rows for contrastive localisation. Unlike the probe, a corpus may hold rows
    that cannot be scored (null, empty ...): they are skipped here (this is a sample, not the data
    being scored) and the count used is recorded in heads.json."""
    if not rows:
        raise ValueError("localize.contrast=corpus: the corpus is empty")
    fmt = task_format(data, list(rows[0].keys()))
    out = []
    for row in rows:
        try:
            out.append(encode_row(row, tokenizer, data, fmt))
        except ValueError:
            continue
    if not out:
        raise ValueError(
            f"localize.contrast=corpus: none of the first {len(rows)} corpus rows can be encoded"
        )
    return out


def probe_batches(encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> list[dict]:
    """Length-sorted (less padding), deterministic batches of ``[B, T]`` tensors."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), i))
    return [
        collate([encoded[i] for i in order[s : s + batch_size]], pad_id)
        for s in range(0, len(order), batch_size)
    ]
