"""The built-in tasks, with lm-evaluation-harness's prompt formats (see each loader)."""
from __future__ import annotations

from training.eval.data_ai2 import arc_train_file, load_arc, load_openbookqa
from training.eval.data_generation import load_gsm8k, load_prompt_reference
from training.eval.data_mmlu import load_mmlu, load_mmlu_dev
from training.eval.data_piqa import load_piqa
from training.eval.generation import exact_match_metrics, text_metrics
from training.eval.registry import TaskSpec, register

AI2_FORMAT = "AI2 jsonl: {question: {stem, choices: [{text, label}]}, answerKey}"


def _arc_pool(path):
    train = arc_train_file(path)
    return load_arc(train) if train is not None else None


register(TaskSpec("perplexity", "perplexity", "perplexity of a text file (token-level and per byte)",
                  "a UTF-8 text file", default_data="tinystories/valid_sample_cased.txt"))
register(TaskSpec("arc_easy", "multiple_choice", "ARC-Easy, 4-way science questions",
                  AI2_FORMAT, "arc/ARC-Easy-Dev.jsonl", load_arc, _arc_pool))
register(TaskSpec("arc_challenge", "multiple_choice", "ARC-Challenge, the harder ARC questions",
                  AI2_FORMAT, "arc/ARC-Challenge-Dev.jsonl", load_arc, _arc_pool))
register(TaskSpec("openbookqa", "multiple_choice", "OpenBookQA, 4-way elementary science",
                  AI2_FORMAT, "openbookqa/test.jsonl", load_openbookqa))
register(TaskSpec("piqa", "multiple_choice", "PIQA, 2-way physical commonsense",
                  "jsonl {goal, sol1, sol2} + <name>-labels.lst (or a 'label' field)", "piqa/valid.jsonl",
                  load_piqa))
register(TaskSpec("mmlu", "multiple_choice", "MMLU, 57 subjects, 0-5 shot from the dev split",
                  "MMLU folder (val/ and dev/ CSVs) or one <subject>_val.csv", "mmlu", load_mmlu,
                  load_mmlu_dev, fewshot_sampler="first_n"))
register(TaskSpec("gsm8k", "generation", "grade-school math, exact match of the final number",
                  "jsonl {question, answer with '#### N'}", None, load_gsm8k, max_tokens=256,
                  stop=("Question:", "</s>", "<|im_end|>", "\n\n"), score=exact_match_metrics))
register(TaskSpec("text_generation", "generation", "BLEU and ROUGE of greedy completions against references",
                  "jsonl {prompt, reference}", None, load_prompt_reference, max_tokens=128, stop=("\n\n",),
                  score=text_metrics))
