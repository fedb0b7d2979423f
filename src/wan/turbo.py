"""``video_turbo``: FastWan 2.1 T2V 1.3B, DMD-distilled from Wan 2.1 T2V 1.3B, sampled in 3 steps.

The sampling is the publisher's own (FastVideo's ``WanDMDPipeline``, its ``DmdDenoisingStage``):

- the timesteps ``DMD_TIMESTEPS`` (1000, 757, 522) on the flow-matching grid of
  ``FlowMatchEulerDiscreteScheduler(shift=8.0)``; one transformer forward per step, no
  classifier-free guidance;
- at each step the clean latent is predicted from the flow output, ``x0 = x_t - sigma_t * flow``,
  with ``sigma_t`` the grid's sigma at the timestep nearest ``t``;
- it is re-noised to the next timestep with fresh noise from the job's seeded generator,
  ``x_next = (1 - sigma_next) * x0 + sigma_next * noise``; the last prediction is the result.

Here that loop is a scheduler, so the turbo model runs in diffusers' ``WanPipeline`` like the
other Wan jobs (prompt encoding, latents, VAE decode, progress callbacks).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

DMD_TIMESTEPS = (1000, 757, 522)  # FastVideo's FastWan2_1_T2V_480P_Config.dmd_denoising_steps
FLOW_SHIFT = 8.0  # the same config's flow_shift
STEPS = len(DMD_TIMESTEPS)


class DmdScheduler(FlowMatchEulerDiscreteScheduler):
    """The DMD sampling above as a diffusers scheduler. ``generator``: the job's, for the re-noising."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = FLOW_SHIFT, **kwargs: Any) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift, **kwargs)
        self.grid_timesteps = self.timesteps.double().clone()  # the full shifted grid, before set_timesteps
        self.grid_sigmas = self.sigmas[: len(self.grid_timesteps)].double().clone()
        self.generator: torch.Generator | None = None

    def sigma_at(self, timestep: float) -> float:
        """The grid's sigma at the grid timestep nearest ``timestep`` (as FastVideo looks it up)."""
        return float(self.grid_sigmas[torch.argmin((self.grid_timesteps - float(timestep)).abs())])

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any
    ) -> None:
        """The distilled steps, whatever is asked (the job validates that nothing else is)."""
        self.timesteps = torch.tensor(DMD_TIMESTEPS, dtype=torch.float32, device=device)
        sigmas = [self.sigma_at(t) for t in DMD_TIMESTEPS] + [0.0]
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self.num_inference_steps = STEPS
        self._step_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Predict the clean latent; re-noise it to the next timestep (the last step returns it)."""
        index = DMD_TIMESTEPS.index(round(float(timestep)))
        clean = sample.double() - self.sigma_at(timestep) * model_output.double()
        if index + 1 < STEPS:
            noise = randn_tensor(
                sample.shape, generator=self.generator, device=sample.device, dtype=torch.float32
            )
            next_sigma = self.sigma_at(DMD_TIMESTEPS[index + 1])
            clean = (1.0 - next_sigma) * clean + next_sigma * noise.double()
        prev = clean.to(sample.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)
