"""The prompts the model is taught and tested with, written once.

The multiple-choice prompt is the one LLaVA-Video and lmms-eval use for Video-MME and EgoSchema:
the question, one ``A. option`` line per option, then the instruction to answer with the letter.
The synthetic instruction data (`videollm.data.synth`), the release pipeline's records and the
evaluation (`eval.qa`, `eval.niah`) all render it here, so a question at test time reads exactly
as the questions the model was trained on.
"""

from __future__ import annotations

LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Describe the video briefly."


def format_options(options) -> str:
    """Option lines as benchmarks print them: ``A. red\\nB. blue …`` (at most 8 options)."""
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def format_mc(question: str, options) -> str:
    """The multiple-choice prompt: question, lettered option lines, the letter instruction."""
    return f"{question}\n{format_options(options)}\n{MC_INSTRUCTION}"
