"""Statistics of the forgetting study v2 (``benchmarks/forgetting.py``): a thin re-export of
:mod:`kappatune.study.stats`, where they live (endpoint interpolation, the paired bootstrap over seeds
and windows, the paired t, Holm's correction, the minimum detectable effects, the Monte-Carlo error of
the bootstrap and the rule that raises its replicates). Kept so that ``import forgetting_stats`` in the
benchmarks and their tests goes on working."""

from kappatune.study.stats import *  # noqa: F401,F403
from kappatune.study.stats import __all__  # noqa: F401
