"""SDXL samplers by their A1111 names, mapped to diffusers schedulers as diffusers' documentation
maps them (Schedulers overview, "A1111/k-diffusion"), each built from the model's own scheduler
configuration (its betas, timestep spacing, prediction type), per job."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

DEFAULT = "euler"  # SDXL base 1.0's own scheduler
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "dpmpp_sde_karras": (DPMSolverSinglestepScheduler, {"use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
}


def scheduler_for(name: str, model_config: Any) -> Any:
    """A fresh scheduler called ``name`` on the model's own scheduler configuration."""
    cls, options = SCHEDULERS[name]
    return cls.from_config(model_config, **options)
