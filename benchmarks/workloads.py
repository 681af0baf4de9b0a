"""Seeded, offline generators of Preble's five workloads (and a mix).

No data set is downloaded: each generator reproduces the *prefix structure* and the length distributions
of one workload of the Preble paper (arXiv 2407.00023, section 2; docs/design.md lists them):

| name               | what shares a prefix                                         | prompt      | output |
|--------------------|--------------------------------------------------------------|-------------|--------|
| tool_use           | one system prompt, then one tool's API docs (tools Zipf a=1.1) | 1835 ± 742  | ~43    |
| embodied_agent     | an episode's growing history; step k+1 depends_on step k       | 2285 ± 471  | ~16    |
| program_generation | a 2400-token few-shot prefix, then a problem (sampled ~10x)    | 3871 ± 1656 | ~190   |
| video_qa           | a video's tokens (256/s, capped), several questions per video  | see below   | ~4     |
| long_doc_qa        | a ~23k-token document, ~11 questions per document              | 23474 ± 6105| ~16    |

A prompt is a list of *segments*: named runs of synthetic token ids (the system prompt, a tool's docs, a
video, a document, one step of an agent's history). A segment's ids are a pure function of
(seed, key, length, vocab), so prompts that start with the same segments start with the same token ids,
exactly like real prompts that share a system prompt or a document, and a request stores only its segment
list (one 20k-token document asked 400 times is held once). ``Request.tokens`` materializes the ids.

"Shared fraction" (``shared_fractions``) is measured as the paper's table reads: the fraction of a request's
prompt whose leading blocks already appeared in an earlier request (what an infinite prefix cache would
hit). The first request of a tool / video / document shares little; the later ones share almost all.

Calibration notes (assumptions where the paper gives only the table):
- tool_use: 500-token system prompt; per-tool docs lognormal(1150, 700); query lognormal(200, 130).
- embodied_agent: 6 task types with their own few-shot examples (1620 ± 250 tokens) after a 150-token
  instruction; the episode's task (120 ± 30); each step appends the previous action (= that step's output
  tokens) and an observation (30 ± 15); 6-30 steps per episode; ``concurrent`` episodes interleave.
- program_generation: the table's 0.97 shared fraction means problems recur: each is sampled
  ``samples_per_problem`` (10) times, pass@k style, in random order.
- video_qa: tokens = min(256 x duration, video_cap_tokens); duration lognormal(28 s, 17 s) per video;
  questions per video 1 + Poisson(duration / 3.5 - 1) (~8, more for longer videos, so the mean duration
  per *request* is ~38 s). NOTE: the spec caps video tokens at 8k, which cannot give the table's
  9865 ± 5976; with the default cap (8192) prompts average ~7k ± 1.7k. ``video_cap_tokens=32768`` (no
  binding cap) reproduces the table's mean and spread (~9.4k ± 5k).
- long_doc_qa: documents normal(23300, 6000) clipped to [6k, 48k]; questions per document
  1 + Poisson(10) (or ``docs=N`` documents drawn uniformly); question 70 ± 30.
- mix: tool_use + video_qa (the paper's Azure-trace mix), 50/50 unless ``components`` says otherwise.

``scale`` multiplies every length (segments and outputs; ``output_scale`` overrides it for outputs), e.g.
0.15 makes long_doc_qa fit a 4096-token CPU model. Synthetic ids are drawn from [16, vocab): the lowest ids
are left out since models often use them as special tokens.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

DEFAULT_VOCAB = 32000
RESERVED_IDS = 16  # ids below this are never generated (special tokens of most tokenizers live there)
_U64 = (1 << 64) - 1

# The spec's table, for tests and for `preble-bench workload --describe`.
SPEC_SHAPES: dict[str, dict[str, float]] = {
    "tool_use": {"prompt_mean": 1835, "prompt_sd": 742, "shared_mean": 0.85, "output_mean": 43},
    "embodied_agent": {"prompt_mean": 2285, "prompt_sd": 471, "shared_mean": 0.97, "output_mean": 16},
    "program_generation": {"prompt_mean": 3871, "prompt_sd": 1656, "shared_mean": 0.97, "output_mean": 190},
    "video_qa": {"prompt_mean": 9865, "prompt_sd": 5976, "shared_mean": 0.88, "output_mean": 4},
    "long_doc_qa": {"prompt_mean": 23474, "prompt_sd": 6105, "shared_mean": 0.91, "output_mean": 16},
}

# Default request rates, per GPU: the top of each of the paper's sweeps (given per 2 GPUs) halved.
DEFAULT_RATE_PER_GPU: dict[str, float] = {
    "tool_use": 9.0,
    "embodied_agent": 9.0,
    "program_generation": 3.0,
    "video_qa": 6.5,
    "long_doc_qa": 1.0,
    "mix": 7.0,
}


# ---------------------------------------------------------------------------------------------- tokens
@functools.lru_cache(maxsize=2048)
def segment_tokens(seed: int, key: str, length: int, vocab: int) -> np.ndarray:
    """The token ids of one segment: deterministic in (seed, key, length, vocab), read-only."""
    if vocab <= RESERVED_IDS:
        raise ValueError(f"vocab must be > {RESERVED_IDS}, got {vocab}")
    s = xxhash.xxh3_64_intdigest(key.encode(), seed=seed & _U64)
    arr = np.random.Generator(np.random.PCG64(s)).integers(RESERVED_IDS, vocab, size=length, dtype=np.int32)
    arr.flags.writeable = False
    return arr


def tokens_to_text(token_ids: Iterable[int]) -> str:
    """A whitespace-separated text stand-in for token ids (one word per id), for text-only endpoints."""
    return " ".join(f"w{t}" for t in token_ids)


@dataclass(slots=True)
class Request:
    """One request of a workload.

    segments: (key, length) runs whose concatenation is the prompt (see module docstring); token_ids, when
    set, is the prompt instead (explicit ids, e.g. loaded from a file). depends_on: the id of a request
    that must have completed before this one is sent (an agent's previous step); arrival is then the
    earliest send time. group: the prefix group (tool, episode, problem, video, document). messages: when set,
    the request is a chat completion of these messages (the live load generator sends it to
    /v1/chat/completions; `text`/`token_ids` then only size it).
    """

    id: str
    segments: tuple[tuple[str, int], ...]
    output_tokens: int
    arrival: float = 0.0
    group: str = ""
    depends_on: str | None = None
    workload: str = ""
    seed: int = 0
    vocab: int = DEFAULT_VOCAB
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def prompt_tokens(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        return sum(n for _, n in self.segments)

    def token_array(self) -> np.ndarray:
        if self.token_ids is not None:
            return np.asarray(self.token_ids, dtype=np.int32)
        parts = [segment_tokens(self.seed, k, n, self.vocab) for k, n in self.segments]
        if not parts:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    @property
    def tokens(self) -> list[int]:
        """The prompt's token ids (built on each access: cache it if you need it twice)."""
        if self.token_ids is not None:
            return list(self.token_ids)
        return self.token_array().tolist()

    def to_dict(self, inline_tokens: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "output_tokens": self.output_tokens, "arrival": self.arrival, "group": self.group,
            "depends_on": self.depends_on, "workload": self.workload, "seed": self.seed, "vocab": self.vocab,
            "prompt_tokens": self.prompt_tokens,
        }
        if inline_tokens or self.token_ids is not None:
            d["token_ids"] = self.tokens
        else:
            d["segments"] = [list(s) for s in self.segments]
        if self.text is not None:
            d["text"] = self.text
        if self.messages is not None:
            d["messages"] = self.messages
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        token_ids = d.get("token_ids")
        return cls(
            id=str(d["id"]),
            segments=tuple((str(k), int(n)) for k, n in d.get("segments", ())),
            output_tokens=int(d["output_tokens"]),
            arrival=float(d.get("arrival", 0.0)),
            group=str(d.get("group", "")),
            depends_on=d.get("depends_on"),
            workload=str(d.get("workload", "")),
            seed=int(d.get("seed", 0)),
            vocab=int(d.get("vocab", DEFAULT_VOCAB)),
            text=d.get("text"),
            token_ids=[int(t) for t in token_ids] if token_ids is not None else None,
            messages=d.get("messages"),
        )


def save_jsonl(requests: Iterable[Request], path: str | Path, *, inline_tokens: bool = False) -> None:
    """One request per line. Segments are stored by key (ids are re-derived on load) unless inline_tokens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in requests:
            f.write(json.dumps(r.to_dict(inline_tokens), separators=(",", ":")) + "\n")


def load_jsonl(path: str | Path) -> list[Request]:
    with Path(path).open() as f:
        return [Request.from_dict(json.loads(line)) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- builders
class _Builder:
    """Shared state of one generator: rng, seed, scale, vocab, and length helpers."""

    def __init__(self, workload: str, seed: int, scale: float, output_scale: float | None, vocab: int) -> None:
        if scale <= 0:
            raise ValueError("scale must be > 0")
        self.workload = workload
        self.seed = seed
        self.scale = scale
        self.output_scale = scale if output_scale is None else output_scale
        self.vocab = vocab
        self.rng = np.random.default_rng([seed, xxhash.xxh32_intdigest(workload.encode())])

    def length(self, n: float) -> int:
        """A segment length after scaling (at least 1)."""
        return max(1, int(round(n * self.scale)))

    def out(self, n: float) -> int:
        return max(1, int(round(n * self.output_scale)))

    def seg(self, key: str, n: float) -> tuple[str, int]:
        return (f"{self.workload}/{key}", self.length(n))

    def normal(self, mean: float, sd: float, lo: float, hi: float, size: int | None = None) -> Any:
        return np.clip(self.rng.normal(mean, sd, size), lo, hi)

    def lognormal(self, mean: float, sd: float, lo: float, hi: float, size: int | None = None) -> Any:
        sigma2 = math.log1p((sd / mean) ** 2)
        mu = math.log(mean) - sigma2 / 2
        return np.clip(self.rng.lognormal(mu, math.sqrt(sigma2), size), lo, hi)

    def request(self, i: int, segments: list[tuple[str, int]], output: int, group: str,
                depends_on: str | None = None) -> Request:
        return Request(id=f"{self.workload}-{i:06d}", segments=tuple(segments), output_tokens=output,
                       group=f"{self.workload}/{group}", depends_on=depends_on, workload=self.workload,
                       seed=self.seed, vocab=self.vocab)


def _zipf_probs(n: int, a: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=float) ** -a
    return p / p.sum()


# ---------------------------------------------------------------------------------------------- workloads
def tool_use(b: _Builder, n: int, *, n_tools: int = 400, zipf_a: float = 1.1, system_tokens: int = 500,
             doc_mean: float = 1150, doc_sd: float = 700, query_mean: float = 200, query_sd: float = 130,
             out_mean: float = 43, out_sd: float = 16, out_cap: int = 128) -> list[Request]:
    """ToolBench G1-like: system prompt + one tool's API docs + a query; tool popularity Zipf(a)."""
    docs = b.lognormal(doc_mean, doc_sd, 150, 6000, n_tools)
    order = b.rng.permutation(n_tools)  # which tool holds which popularity rank
    tools = order[b.rng.choice(n_tools, size=n, p=_zipf_probs(n_tools, zipf_a))]
    queries = b.lognormal(query_mean, query_sd, 20, 2000, n)
    outs = b.normal(out_mean, out_sd, 4, out_cap, n)
    reqs = []
    for i in range(n):
        t = int(tools[i])
        segs = [b.seg("system", system_tokens), b.seg(f"doc/{t}", docs[t]), b.seg(f"query/{i}", queries[i])]
        reqs.append(b.request(i, segs, b.out(outs[i]), f"tool{t}"))
    return reqs


def embodied_agent(b: _Builder, n: int, *, task_types: int = 6, concurrent: int = 64, steps_min: int = 6,
                   steps_max: int = 30, system_tokens: int = 150, fewshot_mean: float = 1620,
                   fewshot_sd: float = 250, task_mean: float = 120, task_sd: float = 30, obs_mean: float = 30,
                   obs_sd: float = 15, out_mean: float = 16, out_sd: float = 5, out_cap: int = 26) -> list[Request]:
    """ALFWorld-like: episodes whose prompt grows by (action, observation) each step; step k+1 depends on k.

    `concurrent` episodes run at once; each request is the next step of a random running episode, so an
    episode's steps are spread over time while their order (and dependency chain) holds.
    """
    fewshot = b.normal(fewshot_mean, fewshot_sd, 400, 4000, task_types)
    reqs: list[Request] = []
    active: list[dict[str, Any]] = []
    next_episode = 0
    while len(reqs) < n:
        while len(active) < concurrent:
            e = next_episode
            next_episode += 1
            t = int(b.rng.integers(task_types))
            active.append({
                "e": e, "step": 0, "steps": int(b.rng.integers(steps_min, steps_max + 1)),
                "segs": [b.seg("system", system_tokens), b.seg(f"fewshot/{t}", fewshot[t]),
                         b.seg(f"task/{e}", b.normal(task_mean, task_sd, 20, 600))],
                "prev": None,
            })
        j = int(b.rng.integers(len(active)))
        ep = active[j]
        i = len(reqs)
        out = b.out(b.normal(out_mean, out_sd, 2, out_cap))
        r = b.request(i, ep["segs"], out, f"episode{ep['e']}", depends_on=ep["prev"])
        reqs.append(r)
        # The next step sees this step's action (its output) and the environment's observation.
        ep["segs"] = ep["segs"] + [(f"{b.workload}/act/{ep['e']}/{ep['step']}", out),
                                   b.seg(f"obs/{ep['e']}/{ep['step'] + 1}", b.normal(obs_mean, obs_sd, 5, 150))]
        ep["prev"] = r.id
        ep["step"] += 1
        if ep["step"] >= ep["steps"]:
            active.pop(j)
    return reqs


def program_generation(b: _Builder, n: int, *, fewshot_tokens: int = 2400, problem_mean: float = 1471,
                       problem_sd: float = 1656, samples_per_problem: int = 10, out_median: float = 150,
                       out_sigma: float = 0.8, out_cap: int = 512) -> list[Request]:
    """APPS-like: one few-shot prefix shared by all, then a problem; each problem sampled several times."""
    n_problems = max(1, math.ceil(n / samples_per_problem))
    problems = b.lognormal(problem_mean, problem_sd, 60, 16000, n_problems)
    which = b.rng.permutation(np.repeat(np.arange(n_problems), samples_per_problem))[:n]
    outs = np.minimum(b.rng.lognormal(math.log(out_median), out_sigma, n), out_cap)
    reqs = []
    for i in range(n):
        p = int(which[i])
        segs = [b.seg("fewshot", fewshot_tokens), b.seg(f"problem/{p}", problems[p])]
        reqs.append(b.request(i, segs, b.out(max(1.0, outs[i])), f"problem{p}"))
    return reqs


def video_qa(b: _Builder, n: int, *, tokens_per_second: int = 256, video_cap_tokens: int = 8192,
             duration_mean: float = 28, duration_sd: float = 17, seconds_per_question: float = 3.5,
             system_tokens: int = 40, question_mean: float = 60, question_sd: float = 20, out_mean: float = 4,
             out_sd: float = 1.5, out_cap: int = 16) -> list[Request]:
    """NExT-QA-like: a short instruction, the video's tokens, a question; longer videos get more questions."""
    videos: list[tuple[int, int]] = []  # (video tokens, questions)
    total = 0
    while total < n:
        dur = float(b.lognormal(duration_mean, duration_sd, 3, 600))
        k = 1 + int(b.rng.poisson(max(0.0, dur / seconds_per_question - 1)))
        videos.append((min(int(tokens_per_second * dur), video_cap_tokens), k))
        total += k
    which = b.rng.permutation(np.repeat(np.arange(len(videos)), [k for _, k in videos]))[:n]
    questions = b.normal(question_mean, question_sd, 8, 400, n)
    outs = b.normal(out_mean, out_sd, 1, out_cap, n)
    reqs = []
    for i in range(n):
        v = int(which[i])
        segs = [b.seg("system", system_tokens), b.seg(f"video/{v}", videos[v][0]), b.seg(f"q/{i}", questions[i])]
        reqs.append(b.request(i, segs, b.out(outs[i]), f"video{v}"))
    return reqs


def long_doc_qa(b: _Builder, n: int, *, docs: int | None = None, questions_mean: float = 11,
                doc_mean: float = 23300, doc_sd: float = 6000, system_tokens: int = 40,
                question_mean: float = 70, question_sd: float = 30, out_mean: float = 16, out_sd: float = 8,
                out_cap: int = 45) -> list[Request]:
    """LooGLE-like: a long document then a question; ~questions_mean questions per document."""
    if docs:
        which = b.rng.integers(docs, size=n)
        n_docs = docs
    else:
        counts: list[int] = []
        while sum(counts) < n:
            counts.append(1 + int(b.rng.poisson(questions_mean - 1)))
        n_docs = len(counts)
        which = b.rng.permutation(np.repeat(np.arange(n_docs), counts))[:n]
    lengths = b.normal(doc_mean, doc_sd, 6000, 48000, n_docs)
    questions = b.normal(question_mean, question_sd, 10, 400, n)
    outs = b.normal(out_mean, out_sd, 1, out_cap, n)
    reqs = []
    for i in range(n):
        d = int(which[i])
        segs = [b.seg("system", system_tokens), b.seg(f"doc/{d}", lengths[d]), b.seg(f"q/{i}", questions[i])]
        reqs.append(b.request(i, segs, b.out(outs[i]), f"doc{d}"))
    return reqs


GeneratorFn = Callable[..., list[Request]]

WORKLOADS: dict[str, GeneratorFn] = {
    "tool_use": tool_use,
    "embodied_agent": embodied_agent,
    "program_generation": program_generation,
    "video_qa": video_qa,
    "long_doc_qa": long_doc_qa,
}
ALIASES = {
    "tool": "tool_use", "toolbench": "tool_use", "tools": "tool_use",
    "agent": "embodied_agent", "alfworld": "embodied_agent",
    "program": "program_generation", "programs": "program_generation", "apps": "program_generation",
    "video": "video_qa", "nextqa": "video_qa",
    "doc": "long_doc_qa", "docs": "long_doc_qa", "document": "long_doc_qa", "loogle": "long_doc_qa",
}
WORKLOAD_NAMES = (*WORKLOADS, "mix")


def canonical_name(name: str) -> str:
    name = name.strip().lower().replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    return name


def parse_components(spec: str) -> list[tuple[str, float]]:
    """'tool_use:0.5,video_qa:0.5' -> [('tool_use', 0.5), ('video_qa', 0.5)]."""
    out = []
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, w = part.partition(":")
        out.append((canonical_name(name), float(w) if w else 1.0))
    if not out or any(w < 0 for _, w in out) or sum(w for _, w in out) <= 0:
        raise ValueError(f"bad mix components {spec!r}")
    return out


def generate(workload: str, n: int, *, seed: int = 0, scale: float = 1.0, output_scale: float | None = None,
             vocab: int = DEFAULT_VOCAB, components: str = "tool_use:0.5,video_qa:0.5",
             **params: Any) -> list[Request]:
    """n requests of `workload` in arrival order (arrival times 0: see with_arrivals / arrivals.py).

    params go to the workload's generator (e.g. n_tools=1000, video_cap_tokens=32768, docs=24). For "mix",
    `components` gives the weights; params are then ignored.
    """
    name = canonical_name(workload)
    if n < 0:
        raise ValueError("n must be >= 0")
    if name != "mix":
        return WORKLOADS[name](_Builder(name, seed, scale, output_scale, vocab), n, **params)
    comps = parse_components(components)
    weights = np.array([w for _, w in comps], dtype=float)
    counts = np.floor(n * weights / weights.sum()).astype(int)
    counts[: n - counts.sum()] += 1  # hand out the remainder
    parts = [WORKLOADS[c](_Builder(c, seed, scale, output_scale, vocab), int(k)) for (c, _), k in zip(comps, counts)]
    # Interleave at random, keeping each component's own order (dependency chains need it).
    labels = np.random.default_rng([seed, 0x4D4958]).permutation(np.repeat(np.arange(len(parts)), counts))
    cursors = [0] * len(parts)
    mixed = []
    for c in labels:
        mixed.append(parts[c][cursors[c]])
        cursors[c] += 1
    for r in mixed:
        r.workload = "mix"
    return mixed


def with_arrivals(requests: Sequence[Request], times: Sequence[float]) -> list[Request]:
    """Set arrival times in list order (times must be at least as many as requests)."""
    if len(times) < len(requests):
        raise ValueError(f"{len(times)} arrival times for {len(requests)} requests")
    for r, t in zip(requests, times):
        r.arrival = float(t)
    return list(requests)


# ---------------------------------------------------------------------------------------------- measures
def shared_fractions(requests: Sequence[Request], block_size: int = 16) -> np.ndarray:
    """Per request, the fraction of its prompt covered by leading blocks seen in earlier requests."""
    from preble_router.block_hash import hash_blocks

    seen: set[int] = set()
    out = np.zeros(len(requests))
    for i, r in enumerate(requests):
        toks = r.tokens
        keys = hash_blocks(toks, block_size, 0)
        hit = 0
        for k in keys:
            if k not in seen:
                break
            hit += 1
        out[i] = min(hit * block_size, len(toks)) / max(1, len(toks))
        seen.update(keys)
    return out


def describe(requests: Sequence[Request], block_size: int = 16, shared: bool = True) -> dict[str, float]:
    """Prompt/output means and spreads, shared fraction, groups: to compare with SPEC_SHAPES."""
    prompts = np.array([r.prompt_tokens for r in requests], dtype=float)
    outs = np.array([r.output_tokens for r in requests], dtype=float)
    d = {
        "requests": len(requests),
        "prompt_mean": float(prompts.mean()) if len(prompts) else 0.0,
        "prompt_sd": float(prompts.std()) if len(prompts) else 0.0,
        "output_mean": float(outs.mean()) if len(outs) else 0.0,
        "output_sd": float(outs.std()) if len(outs) else 0.0,
        "groups": len({r.group for r in requests}),
        "with_dependency": sum(r.depends_on is not None for r in requests),
    }
    if shared and requests:
        sf = shared_fractions(requests, block_size)
        d["shared_mean"] = float(sf.mean())
        d["shared_sd"] = float(sf.std())
    return d


__all__ = [
    "DEFAULT_RATE_PER_GPU", "DEFAULT_VOCAB", "Request", "SPEC_SHAPES", "WORKLOADS", "WORKLOAD_NAMES",
    "canonical_name", "describe", "generate", "load_jsonl", "save_jsonl", "segment_tokens", "shared_fractions",
    "tokens_to_text", "with_arrivals",
]
