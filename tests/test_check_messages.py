"""Every check in csrc/ hands TORCH_CHECK its message as one C string: a string literal, or
``message(...).c_str()`` (csrc/message.h). TORCH_CHECK streams any other message (several arguments, a
``std::string``) through a ``std::ostringstream``, and on an H100 machine every message of ours that a stream
formatted with a number crashed the process instead of raising."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu"))
CHECK = re.compile(r"\bTORCH_CHECK(?:_VALUE|_TYPE|_INDEX|_NOT_IMPLEMENTED)?\(")
STRING = r'"(?:[^"\\]|\\.)*"'


def _call(text: str, start: int) -> tuple[list[str], int]:
    """The top-level arguments of the call whose opening parenthesis is just before ``start``, and the index of
    its closing parenthesis."""
    args, depth, begin, i = [], 0, start, start
    while True:
        c = text[i]
        if c in "\"'":
            i += 1
            while text[i] != c:
                i += 2 if text[i] == "\\" else 1
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return [*args, text[begin:i].strip()], i
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[begin:i].strip())
            begin = i + 1
        i += 1


def _one_c_string(message: str) -> bool:
    if re.fullmatch(rf"{STRING}(\s*{STRING})*", message):  # adjacent literals are one literal
        return True
    if not message.startswith("message("):
        return False
    _, close = _call(message, len("message("))
    return re.fullmatch(r"\)\s*\.c_str\(\)", message[close:]) is not None


def test_every_check_message_is_one_c_string():
    checked, wrong = 0, []
    for path in SOURCES:
        if path.name == "message.h":  # its comment shows the idiom
            continue
        text = path.read_text()
        for match in CHECK.finditer(text):
            args, _ = _call(text, match.end())
            checked += 1
            if len(args) != 2 or not _one_c_string(args[1]):
                line = text.count("\n", 0, match.start()) + 1
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {' '.join(', '.join(args[1:]).split())[:100]}")
    assert checked >= 80  # the scan found the checks
    assert wrong == [], "\n".join(wrong)
