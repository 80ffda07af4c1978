"""Regex-over-names rule tables (big_vision style), with one matching semantics for every table
in the framework: parameter shardings (`sharding.DEFAULT_RULES`), the trainable parts of a
training stage (`structure.trainable.STAGES`) and weight decay (`train.optimizer`).

A parameter's name is its flat path with the component first, `/`-separated
("llm/layers_0/self_attn/q_proj/kernel", `models.flatten`). A table is an ordered sequence of
(pattern, value); a pattern must match the *whole* name (`re.fullmatch`), and a name takes the
value of the *first* rule that matches. A name no rule matches takes `default`, or is an error
naming it when the table has no default. `check_used` makes a rule that matches no name an
error too (a typo in a rule must not silently do nothing).

    >>> table = [(r".*/bias", "no decay"), (r"llm/.*", "decay")]
    >>> first_match(table, "llm/layers_0/mlp/up_proj/bias")      # the first rule wins
    'no decay'
    >>> assign(table, ["llm/embed_tokens/embedding", "vision/post_layernorm/scale"], default="frozen")
    {'llm/embed_tokens/embedding': 'decay', 'vision/post_layernorm/scale': 'frozen'}
    >>> assign(table, ["projector/linear_1/kernel"], what="decay rule")
    Traceback (most recent call last):
    ValueError: no decay rule matches parameter 'projector/linear_1/kernel'
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

_REQUIRED = object()


def first_match(table: Sequence[tuple[str, Any]], name: str, default: Any = _REQUIRED, *, what: str = "rule"):
    """The value of the first rule of `table` whose pattern fully matches `name`; `default` when
    none does. Raises ValueError naming `name` when none does and there is no default."""
    for pattern, value in table:
        if re.fullmatch(pattern, name):
            return value
    if default is _REQUIRED:
        raise ValueError(f"no {what} matches parameter {name!r}")
    return default


def assign(table: Sequence[tuple[str, Any]], names: Iterable[str], default: Any = _REQUIRED, *,
           what: str = "rule", check_used: bool = False) -> dict[str, Any]:
    """{name: value} for every name (`first_match` each). With `check_used`, a rule that matches
    none of `names` is a ValueError listing such rules. Errors name the `what`."""
    names = list(names)
    out = {n: first_match(table, n, default, what=what) for n in names}
    if check_used:
        unused = [p for p, _ in table if not any(re.fullmatch(p, n) for n in names)]
        if unused:
            raise ValueError(f"{what}(s) {unused} match no parameter")
    return out
