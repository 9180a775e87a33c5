"""Data in and out: chat JSONL datasets, question sets, and assistant token spans."""

from emscope.data.chat import ChatExample, check_chat_jsonl, read_chat_jsonl
from emscope.data.questions import Question, builtin_questions_path, load_questions

__all__ = [
    "ChatExample",
    "Question",
    "builtin_questions_path",
    "check_chat_jsonl",
    "load_questions",
    "read_chat_jsonl",
]
