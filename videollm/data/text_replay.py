"""Text replay: text-only turns answered by the base LLM itself, mixed into stage-2 tuning.

Stage 2 teaches short answers about videos (an option's text, a colour word). On its own it turns
that into a habit the LoRA applies to every question, video or not: the embedded default answered
"France" to "What is the capital of France?" and "Juliet" to "Who wrote Romeo and Juliet?" where
the base LLM answers in a sentence. Replaying the base LLM's own greedy answers to plain text
prompts in stage 2 (self-distillation: the targets are what the LLM said before tuning, right or
wrong) ties short replies to video questions and leaves text questions as they were.

The prompts are built here from templates and word lists. None of them asks for a capital city,
an author or a painter: those are the held-out text checks of the evaluation (`TEXT_CHECKS`), so a
tuned model that still answers them has kept its language rather than learnt the checks.

    python -m videollm.data.text_replay --llm smollm2 --n 200 --seed 0 --out data/text_replay.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
from pathlib import Path

import torch

from encoder.errors import UserError, run_cli
from encoder.files import atomic_write_text
from videollm.llm import default_cache_dir, load_llm

logger = logging.getLogger(__name__)

# Held-out text questions and a word the right answer holds; the first is the acceptance check.
TEXT_CHECKS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "paris"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of England?", "london"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("Who wrote Hamlet?", "shakespeare"),
    ("Who painted the Mona Lisa?", "leonardo"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What is the chemical symbol for water?", "h2o"),
    ("What planet do we live on?", "earth"),
)

# (template, fills): "{}" is replaced by each fill.
TEMPLATES: list[tuple[str, tuple[str, ...]]] = [
    ("Explain {} in one sentence.", (
        "photosynthesis", "gravity", "a volcano", "democracy", "an atom", "a rainbow", "the internet",
        "a glacier", "inflation", "an ecosystem", "evaporation", "a vaccine", "electricity", "a black hole",
        "recycling", "a budget", "friction", "a compass", "an eclipse", "a calendar")),
    ("What is {}?", (
        "a noun", "a verb", "a triangle", "a planet", "a mammal", "a desert", "a river", "a library",
        "a museum", "a recipe", "a poem", "a map", "a thermometer", "a bicycle", "an island", "a piano",
        "a telescope", "a battery", "a bridge", "a cloud")),
    ("Give me one tip for {}.", (
        "sleeping better", "learning a new language", "cooking rice", "saving money", "staying focused",
        "running a first race", "writing an email", "keeping plants alive", "packing a suitcase",
        "making new friends", "studying for an exam", "drinking more water", "speaking in public",
        "cleaning a kitchen", "starting a journal")),
    ("Write one sentence about {}.", (
        "the sea", "autumn leaves", "a sleeping cat", "a city at night", "friendship", "rain on a window",
        "a mountain lake", "the first day of spring", "a busy market", "a quiet library", "a thunderstorm",
        "an old bicycle", "fresh bread", "a long train journey", "the moon")),
    ("What is the opposite of '{}'?", (
        "hot", "tall", "fast", "happy", "early", "light", "open", "strong", "loud", "empty", "wet",
        "young", "rich", "near", "soft")),
    ("Name three {}.", (
        "fruits", "animals that live in the sea", "musical instruments", "colours of the rainbow",
        "kinds of weather", "vegetables", "sports played with a ball", "things found in a kitchen",
        "birds", "tools", "board games", "flowers", "kinds of trees", "parts of a car", "insects")),
    ("Why {}?", (
        "is the sky blue", "do leaves change colour in autumn", "is sea water salty", "do we need sleep",
        "does ice float on water", "do cats purr", "do birds migrate", "is exercise good for you",
        "does bread rise", "do we have seasons", "does metal feel cold", "do onions make you cry")),
    ("How do I {}?", (
        "boil an egg", "make a cup of tea", "plant a seed", "fold a paper plane", "write a thank-you note",
        "change a light bulb", "start learning to draw", "wash a wool sweater", "make a simple salad",
        "keep bread fresh", "find the area of a rectangle", "make a paper boat")),
    ("What does a {} do?", (
        "doctor", "baker", "pilot", "farmer", "teacher", "librarian", "firefighter", "carpenter",
        "dentist", "gardener", "plumber", "journalist", "chef", "nurse", "mechanic")),
    ("What is {} plus {}?", ()),
    ("What is {} times {}?", ()),
    ("{}", (
        "Hello!", "How are you today?", "Tell me a joke.", "What can you do?", "Good morning!",
        "Can you help me plan my day?", "Tell me a fun fact.", "What should I cook for dinner?",
        "Give me a word that rhymes with 'cat'.", "Count from one to five.",
        "Suggest a name for a goldfish.", "What is a good book for a long trip?",
        "Describe a perfect weekend.", "What is your favourite season and why?",
        "Spell the word 'garden' backwards.", "How many days are in a week?",
        "How many legs does a spider have?", "What do bees make?", "What is frozen water called?",
        "What do plants need to grow?")),
]


def replay_prompts(n: int, seed: int) -> list[str]:
    """`n` distinct text prompts (template fills first, arithmetic for the rest, at most a
    quarter), deterministic in `seed`; never one of `TEXT_CHECKS`. More than the templates hold is
    a `UserError`."""
    rng = random.Random(seed)
    fixed = [template.format(fill) for template, fills in TEMPLATES for fill in fills]
    rng.shuffle(fixed)
    held = {q.strip().lower() for q, _ in TEXT_CHECKS}
    prompts = [p for p in fixed if p.strip().lower() not in held]
    arithmetic = sorted({template.format(a, b) for template, fills in TEMPLATES if not fills
                         for a in range(2, 13) for b in range(2, 13)})
    rng.shuffle(arithmetic)
    # Fills first; arithmetic makes up the rest, at most a quarter of the set.
    need = max(n - len(prompts), 0)
    if need > min(len(arithmetic), n // 4) or n < 1:
        raise UserError(f"text replay: {n} prompts asked for, the templates give at most "
                        f"{len(prompts) + len(prompts) // 3} (data.text_replay)")
    out = prompts[:n] + arithmetic[:need]
    rng.shuffle(out)
    return out


def _trim(text: str) -> str | None:
    """A reply cut by the token limit, shortened to its last full sentence (None if it has none)."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]  # not the point of "149.6"
    return text[:ends[-1]].strip() if ends else None


def base_answers(model, tokenizer, prompts: list[str], *, system_prompt: str | None = "",
                 max_new_tokens: int = 64, batch_size: int = 16) -> list[str | None]:
    """The LLM's greedy replies to `prompts`, each a one-turn chat rendered with its chat template
    (and `system_prompt`, as training renders it; None: the template's default system turn). A
    reply cut by `max_new_tokens` is trimmed to its last full sentence, or None if it has none."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out: list[str | None] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chats = [([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
                     + [{"role": "user", "content": p}] for p in prompts[i:i + batch_size]]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                finished = eos in row
                text = tokenizer.decode(row[:row.index(eos)] if finished else row, skip_special_tokens=True).strip()
                out.append((text or None) if finished else _trim(text))
    finally:
        tokenizer.padding_side = side
    return out


def write_text_replay(path: str | Path, llm: str, n: int, seed: int, *,
                      system_prompt: str | None = "", max_new_tokens: int = 64,
                      cache_dir: str | Path | None = None) -> int:
    """Write up to `n` text-only LLaVA records (no ``video``) answered by `llm`'s own greedy
    replies to `path` (JSON, atomically); prompts whose reply has no full sentence are left out.
    Returns the number written."""
    prompts = replay_prompts(n, seed)
    model, tokenizer = load_llm(llm, cache_dir=cache_dir if cache_dir is not None else default_cache_dir())
    torch.manual_seed(seed)
    answers = base_answers(model, tokenizer, prompts, system_prompt=system_prompt, max_new_tokens=max_new_tokens)
    records = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
               for i, (p, a) in enumerate(zip(prompts, answers)) if a]
    if not records:
        raise UserError(f"text replay: '{llm}' gave no usable reply to {len(prompts)} prompts")
    atomic_write_text(Path(path), json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    logger.info("text replay: %d of %d prompts answered by %s → %s", len(records), len(prompts), llm, path)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videollm.data.text_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="smollm2", help="the base LLM whose replies are replayed (as stage 2's llm)")
    p.add_argument("--n", type=int, default=200, help="prompts to answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file of text-only LLaVA records")
    p.add_argument("--system-prompt", default="", help="the system turn training renders (data.system_prompt); "
                   "--default-system uses the chat template's own")
    p.add_argument("--default-system", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache-dir", help="LLM cache (default: $VIDEOMAP_LLM_CACHE or ~/.cache/videomap-llm/llm)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    n = write_text_replay(args.out, args.llm, args.n, args.seed,
                          system_prompt=None if args.default_system else args.system_prompt,
                          max_new_tokens=args.max_new_tokens, cache_dir=args.cache_dir)
    print(json.dumps({"out": args.out, "records": n}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
