"""The generate stage's row logic: a CoT the teacher writes carries what it cost (prompt and
completion tokens) and which model the server says wrote it; rows with a CoT pass through
without the engine. The engine is scripted (real teachers run in the e2e tests)."""

from palign.engines.base import Completion
from palign.stages.generate import GenerateSection, generate_rows


class ScriptedTeacher:
    name = "scripted"

    def __init__(self, completions):
        self.completions = completions
        self.calls = 0

    def generate(self, chats, sampling):
        self.calls += 1
        assert len(chats) == len(self.completions)
        return self.completions


def test_teacher_records_carry_tokens_and_the_served_model():
    rows = [{"id": "a", "question": "1+1?", "cot": "given"},
            {"id": "b", "question": "2+2?", "cot": None},
            {"id": "c", "question": "3+3?", "cot": None}]
    teacher = ScriptedTeacher([
        Completion("2+2 is \\boxed{4}", prompt_tokens=31, completion_tokens=9,
                   finish_reason="stop", model="deepseek-reasoner"),
        Completion("3+3 is \\boxed{6}", prompt_tokens=30, completion_tokens=8,
                   finish_reason="length"),  # a local engine names no model
    ])
    given, remote, local = generate_rows(rows, lambda: teacher, GenerateSection())
    assert given.record == {**rows[0], "cot_source": "data"}
    assert remote.record["teacher_prompt_tokens"] == 31
    assert remote.record["teacher_tokens"] == 9
    assert remote.record["teacher_model"] == "deepseek-reasoner"
    assert (local.record["teacher_prompt_tokens"], local.record["teacher_model"]) == (30, None)
    assert local.record["teacher_finish"] == "length" and teacher.calls == 1


def test_a_teacher_error_is_the_rows_reject():
    rows = [{"id": "b", "question": "2+2?", "cot": None}]
    teacher = ScriptedTeacher([Completion(error="HTTP 400 from http://h/v1: bad request")])
    [out] = generate_rows(rows, lambda: teacher, GenerateSection())
    assert out.reason == "teacher: HTTP 400 from http://h/v1: bad request"
    assert out.kind == "row" and out.record is None
