"""Sampling schedulers by name, built from a model's own noise-schedule config.

Every scheduler here is deterministic given the initial noise (DPM-Solver++
2M, UniPC, DDIM with eta=0, Euler without churn), which is what makes a
sample independent of its batch. LCM is the exception: it re-noises between
steps, so its pipeline gets one generator per sample.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from segsynth.io import SegsynthError

# name -> (scheduler class, overrides on top of the model's scheduler config)
SCHEDULERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
ALIASES = {"dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpmpp": "dpm++", "uni-pc": "unipc"}


def scheduler_name(name: str) -> str:
    """Canonical scheduler name, or an error listing the options."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise SegsynthError(f"unknown scheduler {name!r}; options: {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, base_config, **overrides):
    """A fresh scheduler `name` sharing the noise schedule (betas, prediction type) of `base_config`."""
    cls, defaults = SCHEDULERS[scheduler_name(name)]
    return cls.from_config(base_config, **{**defaults, **overrides})
