"""Document functions of the ``videomap_synthqa`` lmms-eval tasks (loaded by lmms-eval from the
task folder by file path; ``!function utils.<name>`` in the YAML files).

A document (one line of ``synthqa/docs.jsonl``, written by ``python -m eval.lmms_wrapper prepare``):
``{"id", "video": "synthqa/videos/<id>.mp4" (relative to this folder), "question", "options": [4
texts], "answer": "A"–"D", "category", "task"}``.
"""

from pathlib import Path

from eval.answer import extract_letter
from videollm.data.prompts import format_options

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [str(HERE / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    pre, post = kwargs.get("pre_prompt", ""), kwargs.get("post_prompt", "")
    return f"{pre}{doc['question']}\n{format_options(doc['options'])}\n{post}".strip()


def process_results(doc, results):
    pred = extract_letter(results[0], doc["options"])
    return {"accuracy": float(pred == doc["answer"])}
