"""A statistical margin for perplexity budgets: the upper confidence bound of a quantized model's
perplexity increase over the held-out windows.

Each window w gives a paired difference d_w = NLL_quantized(w) - NLL_float(w) (mean per-token NLL,
nats). The slice's perplexity is exp of the mean window NLL (windows weigh alike, also when
`<unk>` placeholders leave some with fewer scored tokens), so its ratio is exp(mean d); a
one-sided Student t bound on mean d, exp(mean d + t_{c, n-1} * sd / sqrt(n)) - 1, is the increase
a plan may be expected to stay under on other text of the same kind (with confidence c). It
equals the slice's own increase when the windows agree (sd = 0), and grows as they disagree or
as the slice shrinks: a plan that meets the budget on the mean but not on the bound is refused.
"""

from __future__ import annotations

import functools
import math

from slimport.errors import SlimportError

DEFAULT_CONFIDENCE = 0.9  # on by default for ppl budgets (`--confidence 0`: the mean, as before)


def check_confidence(confidence: float, windows: int) -> None:
    if not 0 <= confidence < 1:
        raise SlimportError(f"--confidence {confidence}: a probability in [0, 1) (0: no margin)")
    if confidence and windows < 2:
        raise SlimportError(
            f"--confidence {confidence}: a bound over windows needs at least 2 (--windows {windows})",
            hint="use --windows 8 or more, or --confidence 0 for the slice's mean alone",
        )


def relative_increase(quantized: list[float], float_: list[float], confidence: float) -> float:
    """Upper `confidence` bound of exp(mean(quantized - float)) - 1 over paired window NLLs;
    confidence 0: the mean itself (the slice's perplexity ratio minus one)."""
    if len(quantized) != len(float_) or not quantized:
        raise ValueError("paired window NLLs of the same, non-empty slice")
    d = [q - f for q, f in zip(quantized, float_, strict=True)]
    n = len(d)
    mean = sum(d) / n
    if not confidence or n < 2:
        return math.expm1(mean)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return math.expm1(mean + t_quantile(confidence, n - 1) * sd / math.sqrt(n))


@functools.lru_cache(maxsize=64)
def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p >= 0.5) of Student's t with `dof` degrees of freedom: bisection on its
    CDF, integrated by Simpson's rule (no scipy in slimport's dependencies)."""
    if not 0.5 <= p < 1 or dof < 1:
        raise ValueError(f"t_quantile({p}, {dof})")
    c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def pdf(x: float) -> float:
        return math.exp(c - (dof + 1) / 2 * math.log1p(x * x / dof))

    def cdf(x: float, steps: int = 400) -> float:
        h = x / steps
        s = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2
