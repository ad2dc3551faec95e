"""Preference data: reading, checking, tokenising and batching (prompt, chosen, rejected) rows.

Accepted files (API.md): JSON Lines, a parquet file, or a folder written by `datasets`
(`save_to_disk`, or a folder of parquet files), one `{"prompt", "chosen", "rejected"}` a row.
Each field is a string or a list of chat messages. In the UltraFeedback-armorm layout the
prompt is a string and chosen/rejected are whole conversations (`[user, assistant]`); the part
that repeats the prompt is dropped, so only the assistant's reply is scored.

Tokenisation applies the tokenizer's chat template: the prompt with the generation prompt, then
the response as the text the full conversation adds after it. Only response tokens count in the
loss. Rows longer than `max_length` lose prompt tokens from the left first (the response is
what is being scored); a response that alone does not fit is cut at its end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fsrl.errors import FsrlError

FIELDS = ("prompt", "chosen", "rejected")
MIN_PROMPT_TOKENS = 16  # a response that overfills max_length still keeps this much prompt


class DataError(FsrlError):
    code = "bad_data"


@dataclass
class PreferencePair:
    """One checked row: the prompt as messages, each response as assistant messages."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    where: str                      # "file.jsonl:12", for error messages


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


# ---------------------------------------------------------------------------------- reading

def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) from a JSONL file, a parquet file or a `datasets` folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"preference data not found: {path}")
    if path.is_dir():
        yield from _read_dataset_folder(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield f"{path}:{n}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read parquet ({exc})") from None
    for n, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {n}", row


def _read_dataset_folder(path: Path) -> Iterator[tuple[str, Any]]:
    parquet = sorted(path.rglob("*.parquet"))
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        if not parquet:
            raise DataError(f"{path}: not a `datasets` folder (no dataset_info.json, "
                            "dataset_dict.json or parquet files)")
        for file in parquet:
            yield from _read_parquet(file)
        return
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        split = next((s for s in ("train", "train_prefs") if s in data), None)
        if split is None:
            raise DataError(f"{path}: a dataset with splits {', '.join(data)}; point at one split's "
                            f"folder (e.g. {path / next(iter(data))})")
        data = data[split]
    for n, row in enumerate(data, start=1):
        yield f"{path} row {n}", row


def _as_messages(value: Any, field: str, where: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and value:
        out = []
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: {field}[{i}] is not a chat message "
                                '({"role": str, "content": str})')
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise DataError(f"{where}: {field} must be a string or a non-empty list of chat messages, "
                    f"got {type(value).__name__}{' (empty)' if value in ([], '') else ''}")


def parse_pair(row: Any, where: str) -> PreferencePair:
    """Check one row and bring it to messages. Raises DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}")
    missing = [f for f in FIELDS if row.get(f) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    prompt = _as_messages(row["prompt"], "prompt", where, "user")
    responses = []
    for field in ("chosen", "rejected"):
        msgs = _as_messages(row[field], field, where, "assistant")
        if msgs[: len(prompt)] == prompt and len(msgs) > len(prompt):
            msgs = msgs[len(prompt):]           # a whole conversation repeating the prompt
        elif isinstance(row[field], list) and msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: {field} is a conversation that does not continue the prompt")
        if not any(m["content"].strip() for m in msgs):
            raise DataError(f"{where}: {field} is empty")
        responses.append(msgs)
    return PreferencePair(prompt=prompt, chosen=responses[0], rejected=responses[1], where=where)


def load_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    pairs = []
    for where, row in read_rows(path):
        pairs.append(parse_pair(row, where))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"{path}: no preference pairs in it")
    return pairs


# ----------------------------------------------------------------------------- tokenising

def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_pair(pair: PreferencePair, tokenizer, max_length: int) -> TokenizedPair:
    """Prompt ids and response ids of one pair, truncated to `max_length` tokens per sequence."""
    if getattr(tokenizer, "chat_template", None):
        prompt_text = _render(tokenizer, pair.prompt, add_generation_prompt=True)
        responses = []
        for msgs in (pair.chosen, pair.rejected):
            full = _render(tokenizer, pair.prompt + msgs, add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise DataError(f"{pair.where}: the chat template renders the conversation with a "
                                "different prompt prefix; cannot tell the response tokens apart")
            responses.append(full[len(prompt_text):])
        prompt_ids = _encode(tokenizer, prompt_text)  # the template writes BOS where it wants one
    else:  # a plain LM: text in, text out, the response ends with EOS
        prompt_text = "\n".join(m["content"] for m in pair.prompt)
        responses = ["".join(m["content"] for m in msgs) for msgs in (pair.chosen, pair.rejected)]
        prompt_ids = list(tokenizer(prompt_text)["input_ids"])
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        responses_ids = [_encode(tokenizer, r) + eos for r in responses]
        return truncate(TokenizedPair(prompt_ids, *responses_ids), max_length)
    return truncate(TokenizedPair(prompt_ids, *(_encode(tokenizer, r) for r in responses)), max_length)


def truncate(pair: TokenizedPair, max_length: int) -> TokenizedPair:
    """Fit prompt + response into max_length for both responses, keeping the response.

    The prompt loses tokens from its left (both responses keep the same prompt) down to
    MIN_PROMPT_TOKENS (or a quarter of max_length, if smaller); only then is a response cut,
    at its end.
    """
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if len(pair.prompt_ids) + longest <= max_length:
        return pair
    floor = min(len(pair.prompt_ids), MIN_PROMPT_TOKENS, max_length // 4)
    keep_prompt = max(floor, max_length - longest)
    prompt_ids = pair.prompt_ids[len(pair.prompt_ids) - keep_prompt:]
    room = max_length - len(prompt_ids)
    return TokenizedPair(prompt_ids, pair.chosen_ids[:room], pair.rejected_ids[:room], truncated=True)


# ------------------------------------------------------------------------------- batching

@dataclass
class PairBatch:
    """B pairs as 2B sequences, chosen rows first, right-padded.

    input_ids (2B, T) long; attention_mask (2B, T) long; positions (2B, T) long, each token's
    index in its own row, -1 at padding (never steered); response_mask (2B, T) bool, True at the
    response tokens that are scored.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    response_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def first_response_position(self) -> int:
        """Smallest index of a scored token in any row (bounds the logits worth computing)."""
        return int(self.response_mask.float().argmax(-1).min())

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                  self.positions, self.response_mask)))


def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    T = max(len(a) + len(b) for a, b in seqs)
    N = len(seqs)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((N, T), dtype=torch.bool)
    lengths = torch.zeros(N, dtype=torch.long)
    for i, (prompt, response) in enumerate(seqs):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        response_mask[i, len(prompt):n] = True
        lengths[i] = n
    positions = torch.arange(T)[None, :].expand(N, T)
    real = positions < lengths[:, None]                                        # (N, T)
    return PairBatch(input_ids=input_ids, attention_mask=real.long(),
                     positions=torch.where(real, positions, -1), response_mask=response_mask)


class PreferenceDataset:
    """Tokenised pairs in memory, with a seeded per-epoch order."""

    def __init__(self, pairs: Sequence[PreferencePair], tokenizer, max_length: int):
        if max_length < 8:
            raise DataError(f"--max-length {max_length} is too small")
        self.source = [p.where for p in pairs]
        self.items = [tokenize_pair(p, tokenizer, max_length) for p in pairs]
        self.truncated = sum(item.truncated for item in self.items)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.items)

    def order(self, epoch: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=g).tolist()

    def batch(self, indices: Sequence[int]) -> PairBatch:
        return collate([self.items[i] for i in indices], self.pad_id)

    def batches(self, batch_size: int) -> Iterator[PairBatch]:
        """In file order (evaluation)."""
        for start in range(0, len(self.items), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self.items))))
