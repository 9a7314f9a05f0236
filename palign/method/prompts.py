"""Every prompt palign sends. Our own wording. The training target's format is
``palign.method.targets``.

The judge prompt puts what all probes of one example share first (instruction, problem, the
earlier sentences) and what changes last, so an engine's prefix cache can serve the shared part.
"""

from __future__ import annotations

# A chat: a list of {"role", "content"} messages (what the engines take)
Chat = list[dict[str, str]]

SOLVE_INSTRUCTION = "Reason step by step, and give your final answer in \\boxed{}."


def teacher_chat(question: str) -> Chat:
    """Ask the teacher for a long, self-checking chain of thought."""
    return [{"role": "user", "content": (
        "Work through the math problem below carefully. Think out loud at length, check each "
        "step, and revisit anything doubtful before you commit to an answer. "
        "End with the final answer in \\boxed{}.\n\n"
        f"Problem:\n{question}"
    )}]


def judge_chat(question: str, prefix: str) -> Chat:
    """Ask the student whether the partial solution leaves only routine work."""
    return [{"role": "user", "content": (
        "You will see a math problem and the opening part of a worked solution. Decide whether "
        "that opening already holds the key ideas, so that you could finish the solution "
        "yourself with routine steps.\n\n"
        f"Problem:\n{question}\n\n"
        f"Opening of the solution:\n{prefix}\n\n"
        "Answer with one word: ENOUGH if you could finish from here, NOT_ENOUGH if an "
        "essential idea is still missing."
    )}]


def align_chat(question: str, prefix: str) -> Chat:
    """Ask the student to continue from the teacher's prefix."""
    return [{"role": "user", "content": (
        "Below is a math problem and a draft of the first steps of its solution. Continue from "
        "where the draft stops: reason step by step to the end, and give the final answer in "
        "\\boxed{}.\n\n"
        f"Problem:\n{question}\n\n"
        f"Draft:\n{prefix}"
    )}]


def student_question(question: str) -> str:
    """The user turn of a training example and of evaluation prompts."""
    return f"{question}\n\n{SOLVE_INSTRUCTION}"

