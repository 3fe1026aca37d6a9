"""Unbiased pass@k (Chen et al., 2021).

For a problem with ``n`` sampled completions of which ``c`` pass, the probability that at
least one of ``k`` completions drawn without replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form avoids the huge binomials of large ``n``.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"pass@k: {name} must be an int, got {value!r}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct.

    Requires ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"pass@k: n={n} samples, need at least 1")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c={c} correct samples must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean_pass_at_k(results: Iterable[tuple[int, int]], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Mean pass@k over problems given as ``(n, c)`` pairs.

    Returns ``{"pass@1": ..., ...}`` for every ``k`` in ``ks`` that does not exceed the
    smallest ``n`` (a k larger than some problem's sample count is left out, as is usual).
    """
    results = [(int(n), int(c)) for n, c in results]
    if not results:
        raise ValueError("pass@k: no problems given")
    n_min = min(n for n, _ in results)
    out = {}
    for k in ks:
        if k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in results) / len(results)
    return out
