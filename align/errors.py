"""The one exception type that reaches the user as a single line and exit code 2.

Anything raised as `AlignError` is a problem with the user's input (a recipe, a data
file, a path, an argument). The command line prints its message on one line and exits
with status 2; every other exception is a bug and keeps its traceback.
"""


class AlignError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


def where(path, row: int | None = None, *, line: bool = False) -> str:
    """`data.jsonl, line 5` / `data.parquet, row 5` / `data.jsonl`: the location part of an error."""
    if row is None:
        return str(path)
    return f"{path}, {'line' if line else 'row'} {row}"
