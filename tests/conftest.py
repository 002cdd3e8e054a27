"""Hypothesis profiles for the property tests.

* `dev` (the default here): few examples, so the whole suite stays quick on a laptop or a 2-core runner.
* `thorough`: many examples, for a deliberate hunt:  HYPOTHESIS_PROFILE=thorough pytest
  (or `pytest --hypothesis-profile=thorough`).
* `ci`: hypothesis's built-in profile (derandomised, no deadline, no example database). Hypothesis loads it by
  itself when it sees CI=true, so we leave it in place rather than overriding it with `dev`.

deadline=None everywhere: the first call of a JIT-compiled kernel (numba) takes seconds, which is no failure.
"""
import os

from hypothesis import settings

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)

if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif settings.get_current_profile_name() != "ci":  # hypothesis chose `ci` itself when it detected CI
    settings.load_profile("dev")
