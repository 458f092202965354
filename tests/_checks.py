"""Assertion helpers shared by the test modules (tests/ is on sys.path through its conftest.py)."""
import re


def error_names(exc: BaseException, op_name: str, names) -> bool:
    """True when the error message names the op and, as a whole word, one of ``names``."""
    msg = str(exc)
    return op_name in msg and any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", msg) for n in names)
