"""The worker: payload -> validated job -> family plan -> generation -> storage -> callback."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from src.callback import completed, failed
from src.contract import JobError, JobRequest, parse_request
from src.media.assets import Generation, store_generation
from src.media.storage import Storage, build_storage
from src.progress import Progress, Sender, runpod_sender
from src.settings import Settings

log = logging.getLogger(__name__)


class ModelFamily(Protocol):
    """A family of models (SDXL, Wan) that serves some job types."""

    name: str
    job_types: frozenset[str]

    def warm_up(self) -> None:
        """Run the models once so the first job pays no first-call cost."""

    def plan(self, request: JobRequest) -> Any:
        """Validate the family-specific payload; raise JobError naming the field."""

    def generate(self, plan: Any, progress: Progress) -> Generation:
        """Run the models for a plan."""


class Worker:
    """Holds the loaded model families and the storage backend; runs one job at a time."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        families: list[ModelFamily],
        progress_sender: Sender | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.families = families
        self._progress_sender = progress_sender
        self._by_type = {job_type: family for family in families for job_type in family.job_types}

    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one RunPod job and return the callback dict (or a failed one)."""
        job_id = _raw_job_id(job)
        started = time.perf_counter()
        try:
            request = parse_request(job)
            job_id = request.id
            family = self._family_for(request.type)
            plan = family.plan(request)
            progress = Progress(job, self._progress_sender, self.settings.progress_interval_s)
            generation = family.generate(plan, progress)
            try:
                assets = store_generation(self.storage, request.user_id, request.id, generation)
            except Exception as err:
                log.exception("job %s: storing assets failed", job_id)
                raise JobError(
                    "storage", f"could not store the assets: {type(err).__name__}: {err}"
                ) from None
        except JobError as err:
            log.warning("job %s failed: %s", job_id, err)
            return failed(job_id, str(err))
        except Exception as err:
            log.exception("job %s: generation failed", job_id)
            return failed(job_id, f"generation: {type(err).__name__}: {err}")
        elapsed = time.perf_counter() - started
        log.info("job %s completed: %s, %d assets in %.2f s", job_id, request.type, len(assets), elapsed)
        return completed(
            request.id,
            assets,
            generation_time=elapsed,
            job_type=request.type,
            reference_mode=generation.reference_mode,
        )

    def _family_for(self, job_type: str) -> ModelFamily:
        family = self._by_type.get(job_type)
        if family is not None:
            return family
        from src.families import ALL_JOB_TYPES

        if job_type in ALL_JOB_TYPES:
            loaded = ",".join(self.settings.worker_models)
            raise JobError(
                "type",
                f"{job_type!r} needs a model family this worker does not load (WORKER_MODELS={loaded})",
            )
        known = ", ".join(sorted(ALL_JOB_TYPES))
        raise JobError("type", f"unknown job type {job_type!r}; expected one of: {known}")


def _raw_job_id(job: Any) -> str | None:
    """The job id to echo in an error before the payload is validated."""
    if not isinstance(job, dict):
        return None
    payload = job.get("input")
    candidate = payload.get("id") if isinstance(payload, dict) else None
    candidate = candidate or job.get("id")
    return candidate if isinstance(candidate, str) else None


def start_worker(settings: Settings) -> Worker:
    """Build storage, load and warm the configured families: everything done once at start."""
    from src.families import load_families

    storage = build_storage(settings)
    families = load_families(settings)
    return Worker(settings, storage, families, runpod_sender())
