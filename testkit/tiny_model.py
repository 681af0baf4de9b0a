"""Build a small random-weight Llama plus a byte-level BPE tokenizer, fully offline.

No model hub is reachable here, yet tests and demos need a model vLLM can serve. Random weights are
fine: the router only cares about tokens, prefixes and latency (send ``"ignore_eos": true`` to get the
asked length). Usage::

    python -m testkit.tiny_model OUT_DIR [--size tiny|small] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the recipe changes so stale models on disk get rebuilt.
RECIPE_VERSION = 1
STAMP_NAME = ".tiny_model_stamp.json"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2 (trained first, in this order)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# Llama-like template: BOS once, one header per turn, every turn closed by EOS. The BOS comes from the
# template, so chat prompts must be tokenized with add_special_tokens=False (vLLM does so for chat).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\\n' + (message['content'] | trim) + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int


SIZES: dict[str, ModelSpec] = {
    # ~1.3 MB: loads instantly, for tests.
    "tiny": ModelSpec(128, 256, 2, 4, 2, 1024, 4096),
    # ~42 MB: a 4k-token prefill takes ~2 s on one core, so prefix-cache hits show up in latency.
    "small": ModelSpec(512, 1536, 6, 8, 4, 2048, 8192),
}

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _corpus_files() -> list[str]:
    # Sorted so training (and hence the vocab) is deterministic.
    files = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    if not files:
        # Fallback for machines without common-licenses: the stdlib sources are always there.
        stdlib = sysconfig.get_paths()["stdlib"]
        files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:200]
    if not files:
        raise RuntimeError("no local text found to train the tokenizer on")
    return files


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> needed
        show_progress=False,
    )
    tk.train(_corpus_files(), trainer)
    # Llama-like: encode(text) with special tokens prepends <s> (what vLLM /v1/completions does).
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tk


def _stamp(spec: ModelSpec, size: str, seed: int) -> dict:
    return {"recipe": RECIPE_VERSION, "size": size, "seed": seed, **asdict(spec)}


def is_complete(out_dir: Path, size: str = "tiny", seed: int = 0) -> bool:
    """True if out_dir already holds a finished build with exactly these parameters."""
    out_dir = Path(out_dir)
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _stamp(SIZES[size], size, seed) and all((out_dir / f).is_file() for f in REQUIRED_FILES)


def build_tiny_model(out_dir: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a servable HF model dir (Llama, bf16, random weights) to out_dir and return it.

    Deterministic given (size, seed); skipped if out_dir already holds the same build.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    out_dir = Path(out_dir)
    if is_complete(out_dir, size, seed):
        return out_dir
    spec = SIZES[size]
    out_dir.mkdir(parents=True, exist_ok=True)
    # Remove the stamp first: a build interrupted from here on must not look complete.
    (out_dir / STAMP_NAME).unlink(missing_ok=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tk = _train_tokenizer(spec.vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=spec.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )
    tok.save_pretrained(out_dir)
    # transformers 5 writes tokenizer_class "TokenizersBackend" and the template only to
    # chat_template.jinja; name the class and inline the template too so transformers 4.x loads it as well.
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")

    cfg = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    # fork_rng: seed the init without clobbering the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)

    (out_dir / STAMP_NAME).write_text(json.dumps(_stamp(spec, size, seed), indent=1, sort_keys=True))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_tiny_model(args.out_dir, args.size, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
