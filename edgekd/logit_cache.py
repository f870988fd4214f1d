"""The teacher logit cache: the teacher's top-k log-probs at every trained position, computed once
per corpus and read by the training stages instead of running the teacher.

Per position (a logit index t whose next label is not -100, exactly what the KD loss uses) it keeps
the k largest log-probs at temperature 1 (fp16) with their token ids (int32) and the log of the
mass outside them (fp32). Training gets dense stand-in logits at its temperature T (see
dense_logprobs), so every divergence in losses.py applies unchanged. On disk: a folder of
safetensors shards and a manifest (what corpus, tokenizer, top_k and teacher made it, each shard's
sha256), one format whether the teacher ran in process or was served, made here or elsewhere.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from edgekd import atomic
from edgekd.atomic import atomic_path
from edgekd.console import console
from edgekd.data import TokenizedExample, collate
from edgekd.errors import EdgekdError
from edgekd.losses import IGNORE_INDEX

# log of the mass outside the top k when the top k hold all of it (keeps the rebuilt logits finite).
_MIN_LOG_REST = -80.0
# An empty slot's log-prob: the fp16 floor (top_k_entries clamps there too; exp of it is 0).
_EMPTY = torch.finfo(torch.float16).min


def examples_fingerprint(examples: list[TokenizedExample]) -> str:
    """sha256 hex of the token ids and labels, in order: the cache key of the training examples."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode() + b"\n")
    return h.hexdigest()


def trained_positions(labels: list[int]) -> list[int]:
    """Logit indices the KD loss uses: t such that labels[t + 1] is a target."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


def top_k_entries(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """[P, V] logits -> int32 ids [P, k], fp16 log-probs [P, k], fp32 log rest-mass [P]."""
    logp = logits.float().log_softmax(-1)
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1).clamp(min=_MIN_LOG_REST)
    fp16_min = torch.finfo(torch.float16).min
    return ids.to(torch.int32), top.clamp(min=fp16_min).to(torch.float16), rest


def dense_logprobs(
    ids: Tensor, logprobs: Tensor, log_rest: Tensor, vocab: int, temperature: float
) -> Tensor:
    """[P, V] logits whose softmax at `temperature` is the rebuilt tempered teacher (T * log q_T).

    q_T keeps the top k tempered exactly (p_i^(1/T), relative to each other). The tail's tempered
    mass is unknown; it is taken as if the rest mass r sat on r / p_k tokens of the k-th largest
    probability p_k (so r * p_k^(1/T - 1)), the least a tail bounded by p_k can have, and spread
    evenly over the other V - k tokens. At T = 1 that is the top k plus r spread evenly. Spreading
    r evenly before tempering instead would hand the flat tail most of the mass at T > 1.

    Entries at the fp16 floor are empty slots (a served teacher's alternatives that named no
    token id, or fewer than k given): their ids keep the tail's share and they are not the k-th
    largest probability."""
    top = logprobs.float() / temperature
    real = logprobs.float().masked_fill(logprobs <= _EMPTY, math.inf)
    log_tail = log_rest.float() + (1 / temperature - 1) * real.min(-1).values
    norm = torch.logaddexp(top.logsumexp(-1), log_tail)
    # The tail is spread over every token not given, the ids of empty slots too.
    n_tail = (vocab - (logprobs > _EMPTY).sum(-1)).clamp(min=1).float()
    spread = log_tail - norm - n_tail.log()
    out = spread[:, None].expand(-1, vocab).clone()
    # An empty slot's id keeps the tail's share: its slot may name any token, the target too.
    given = torch.where(logprobs <= _EMPTY, spread[:, None], top - norm[:, None])
    out.scatter_(-1, ids.long(), given)
    return out * temperature


@torch.no_grad()
def compute(
    teacher, examples: list[TokenizedExample], *, top_k: int, batch_size: int, pad_id: int
) -> dict[str, Tensor]:
    """Run the teacher over `examples` and keep the top_k entries at each trained position."""
    device = next(teacher.parameters()).device
    parts: dict[str, list[Tensor]] = {"ids": [], "logprobs": [], "log_rest": [], "positions": []}
    counts = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id)
        logits = teacher(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        for row, ex in enumerate(chunk):
            pos = torch.tensor(trained_positions(ex.labels), dtype=torch.long)
            ids, logprobs, rest = top_k_entries(logits[row, pos.to(device)].cpu(), top_k)
            for name, value in zip(parts, (ids, logprobs, rest, pos.to(torch.int32)), strict=True):
                parts[name].append(value)
            counts.append(len(pos))
    out = {name: torch.cat(values) for name, values in parts.items()}
    out["offsets"] = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
    out["vocab"] = torch.tensor([logits.shape[-1]], dtype=torch.long)
    return out


def save(path: Path, tensors: dict[str, Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


class LogitCache:
    """A loaded cache; `teacher_logits` stands in for the teacher's shifted logits."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.t = tensors
        self.vocab = int(tensors["vocab"][0])

    @classmethod
    def load(cls, path: Path) -> LogitCache:
        """A cache file, or a cache folder's shards as its manifest lists them (unchecked: see
        load_dir)."""
        if Path(path).is_dir():
            shards = read_manifest(Path(path))["shards"]
            return cls(_concat([load_file(str(Path(path) / s["file"])) for s in shards]))
        return cls(load_file(str(path)))

    @property
    def num_examples(self) -> int:
        return len(self.t["offsets"]) - 1

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())

    def teacher_logits(self, idx: list[int], width: int, device, temperature: float) -> Tensor:
        """[len(idx), width - 1, V] stand-in teacher logits at `temperature` (dense_logprobs) for
        collated examples `idx`, aligned like shift_for_next_token's logits; untrained positions
        hold zeros (the loss never reads them)."""
        out = torch.zeros(len(idx), width - 1, self.vocab, device=device)
        offsets = self.t["offsets"]
        for row, i in enumerate(idx):
            a, b = int(offsets[i]), int(offsets[i + 1])
            t = {name: self.t[name][a:b] for name in ("ids", "logprobs", "log_rest")}
            rebuilt = dense_logprobs(**t, vocab=self.vocab, temperature=temperature)
            out[row, self.t["positions"][a:b].long()] = rebuilt.to(device)
        return out


def from_entries(
    entries: list[list[list[tuple[int, float]] | None]],
    targets: list[list[int]],
    positions: list[list[int]],
    *,
    top_k: int,
    vocab: int,
) -> dict[str, Tensor]:
    """The cache's tensors from (id, log-prob) alternatives per position, as a served teacher
    gives them: fewer than top_k where some could not be mapped, none where the server gave none.

    The mass outside the given alternatives is the rest, and the smallest given one bounds the
    tail as in dense_logprobs. Slots left empty take distinct unused ids at the fp16 floor (they
    keep the tail's share whichever id they name, and are not the k-th largest); a position
    without alternatives puts all its mass on its target token (it trains on the label)."""
    k = min(top_k, vocab)
    parts: dict[str, list[Tensor]] = {"ids": [], "logprobs": [], "log_rest": [], "positions": []}
    counts = []
    for rows, tgt, pos in zip(entries, targets, positions, strict=True):
        for pairs, target in zip(rows, tgt, strict=True):
            pairs = sorted(pairs or [(target, 0.0)], key=lambda p: -p[1])[:k]
            mass = sum(math.exp(lp) for _, lp in pairs)
            log_rest = math.log(1 - mass) if mass < 1 else _MIN_LOG_REST
            log_rest = max(log_rest, _MIN_LOG_REST)
            used = {i for i, _ in pairs}
            pad = list(itertools.islice((i for i in range(vocab) if i not in used), k - len(pairs)))
            ids = [i for i, _ in pairs] + pad
            lps = [lp for _, lp in pairs] + [_EMPTY] * len(pad)
            rest = log_rest
            parts["ids"].append(torch.tensor(ids, dtype=torch.int32))
            parts["logprobs"].append(torch.tensor(lps).to(torch.float16))
            parts["log_rest"].append(torch.tensor(max(rest, _MIN_LOG_REST)))
        parts["positions"].append(torch.tensor(pos, dtype=torch.int32))
        counts.append(len(pos))
    out = {
        "ids": torch.stack(parts["ids"]) if parts["ids"] else torch.zeros(0, k, dtype=torch.int32),
        "logprobs": torch.stack(parts["logprobs"])
        if parts["logprobs"]
        else torch.zeros(0, k, dtype=torch.float16),
        "log_rest": torch.stack(parts["log_rest"]).float() if parts["log_rest"] else torch.zeros(0),
        "positions": torch.cat(parts["positions"]),
    }
    out["offsets"] = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
    out["vocab"] = torch.tensor([vocab], dtype=torch.long)
    return out


def tokenizer_hash(tokenizer) -> str:
    """sha256 hex of the vocabulary (piece -> id) and special tokens: what a cache's ids mean."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    return h.hexdigest()


def dense_reference(tensors: dict[str, Tensor]) -> list[Tensor]:
    """Per example, [positions, V] log-probs at temperature 1 rebuilt from cache tensors (the
    held-out reference of a teacher that gives only its top k)."""
    out = []
    offsets, vocab = tensors["offsets"], int(tensors["vocab"][0])
    for i in range(len(offsets) - 1):
        a, b = int(offsets[i]), int(offsets[i + 1])
        t = {name: tensors[name][a:b] for name in ("ids", "logprobs", "log_rest")}
        out.append(dense_logprobs(**t, vocab=vocab, temperature=1.0).log_softmax(-1))
    return out


# A cache folder: shards of whole examples and, written last, a manifest naming what made them.
CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = 1
# The sub-folder holding the teacher's top-k log-probs at the held-out positions (the same format),
# from which a build that reads the cache takes its held-out reference without the teacher.
REFERENCE_DIR = "reference"
SHARD_EXAMPLES = 256


def _slice(tensors: dict[str, Tensor], a: int, b: int) -> dict[str, Tensor]:
    """Examples a..b of cache tensors, with offsets from 0."""
    offsets = tensors["offsets"]
    lo, hi = int(offsets[a]), int(offsets[b])
    out = {name: tensors[name][lo:hi].contiguous() for name in ("ids", "logprobs", "log_rest")}
    out["positions"] = tensors["positions"][lo:hi].contiguous()
    out["offsets"] = (offsets[a : b + 1] - lo).contiguous()
    out["vocab"] = tensors["vocab"]
    return out


def write_dir(folder: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write cache tensors to `folder` as shards of SHARD_EXAMPLES examples and manifest.json
    (meta: corpus fingerprint, tokenizer hash, top_k, teacher; plus each shard's sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(tensors["offsets"]) - 1
    shards = []
    for i, a in enumerate(range(0, max(n, 1), SHARD_EXAMPLES)):
        b = min(a + SHARD_EXAMPLES, n)
        name = f"shard-{i:05d}.safetensors"
        save(folder / name, _slice(tensors, a, b))
        path = folder / name
        shards.append(
            {"file": name, "examples": [a, b], "bytes": path.stat().st_size,
             "sha256": atomic.sha256_file(path)}
        )  # fmt: skip
    manifest = {"format": CACHE_FORMAT, **meta, "examples": n, "shards": shards}
    atomic.write_json(folder / CACHE_MANIFEST, manifest)


def remove_dir(folder: Path) -> None:
    """Remove a cache folder's manifest (first: without it the folder is no cache) and shards."""
    atomic.remove(folder / CACHE_MANIFEST)
    for shard in folder.glob("shard-*.safetensors"):
        atomic.remove(shard)
    if (folder / REFERENCE_DIR).is_dir():
        remove_dir(folder / REFERENCE_DIR)


def read_manifest(folder: Path) -> dict:
    path = folder / CACHE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"], manifest["corpus"], manifest["tokenizer"], manifest["top_k"]
    except FileNotFoundError:
        raise EdgekdError(
            f"logit cache {folder} has no {CACHE_MANIFEST}; pass a folder written by "
            "`edgekd teacher-cache` (or one whose writing finished)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise EdgekdError(f"{path} is not a logit cache manifest ({err}); write it again") from None
    return manifest


def check_shards(folder: Path, manifest: dict) -> list[tuple[str, str]]:
    """(shard file, problem) for each shard that is missing, truncated or changed."""
    problems = []
    for shard in manifest["shards"]:
        name = shard["file"]
        path = folder / name
        if Path(name).name != name or name in ("", ".", ".."):
            problems.append((name, "not a file name inside the cache folder"))
        elif path.is_symlink() or not path.is_file():
            problems.append((name, "missing"))
        elif path.stat().st_size != shard["bytes"]:
            problems.append(
                (name, f"{path.stat().st_size} bytes, the manifest says {shard['bytes']} "
                 "(truncated or replaced)")
            )  # fmt: skip
        elif atomic.sha256_file(path) != shard["sha256"]:
            problems.append((name, "its sha256 differs from the manifest's"))
    return problems


def refuse_bad_shards(folder: Path, manifest: dict) -> None:
    """One line for the first shard that does not match the manifest."""
    if problems := check_shards(folder, manifest):
        name, problem = problems[0]
        raise EdgekdError(
            f"logit cache {folder / name}: {problem}; copy the folder again or rerun "
            "`edgekd teacher-cache`"
        )


def load_dir(
    folder: Path, *, corpus: str, tokenizer: str, top_k: int, teacher: str | None = None
) -> LogitCache:
    """A cache folder, refused (one line naming the mismatch) when it was made for another
    corpus, tokenizer or top_k, or when a shard is missing, truncated or changed."""
    manifest = read_manifest(folder)
    for what, want, key, fix in (
        # The tokenizer first: another one also tokenizes the corpus differently.
        ("tokenizer", tokenizer, "tokenizer", "a teacher and student with the same tokenizer"),
        ("training corpus", corpus, "corpus", "the same data and data.* settings"),
        ("top_k", top_k, "top_k", f"logit_cache.top_k={manifest['top_k']}"),
    ):
        if manifest[key] != want:
            raise EdgekdError(
                f"logit cache {folder} was made for another {what} ({key} {manifest[key]!s:.12}, "
                f"this build's is {want!s:.12}); make it again with `edgekd teacher-cache` for "
                f"this build, or use {fix}"
            )
    refuse_bad_shards(folder, manifest)
    if teacher is not None and manifest.get("teacher") != teacher:
        # The same teacher may be reached another way (a URL seen from another machine).
        console.print(
            f"logit cache {folder}: made by {manifest.get('teacher')}; this build's teacher is "
            f"{teacher}",
            highlight=False,
            soft_wrap=True,
        )
    parts = [load_file(str(folder / s["file"])) for s in manifest["shards"]]
    return LogitCache(_concat(parts))


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    out = {name: torch.cat([p[name] for p in parts]) for name in ("ids", "logprobs", "log_rest")}
    out["positions"] = torch.cat([p["positions"] for p in parts])
    offsets, base = [torch.zeros(1, dtype=torch.long)], 0
    for p in parts:
        offsets.append(p["offsets"][1:] + base)
        base += int(p["offsets"][-1])
    out["offsets"] = torch.cat(offsets)
    out["vocab"] = parts[0]["vocab"]
    return out
