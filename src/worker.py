"""The worker: payload -> validated job -> family plan -> generation -> storage -> callback."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from src.callback import completed, failed
from src.contract import JobError, JobRequest, parse_request
from src.faults import describe_gpu_fault, is_gpu_fault, release_gpu_memory
from src.joblog import JobLog, preview, redact
from src.media.assets import Generation, store_generation
from src.media.storage import JobObjects, Storage, build_storage
from src.progress import Progress, Sender, runpod_sender
from src.settings import Settings

log = logging.getLogger(__name__)


class ModelFamily(Protocol):
    """A family of models (SDXL, Wan) that serves some job types."""

    name: str
    job_types: frozenset[str]

    def warm_up(self) -> dict[str, float]:
        """Run the models once so the first job pays no first-call cost; seconds per named phase."""

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
        """Run one RunPod job and return the callback dict (or a failed one). Never raises."""
        job_id = _raw_job_id(job)
        journal = JobLog(job_id, _raw_field(job, "type"))
        journal.stage("received", prompt=preview(_raw_field(job, "prompt")))
        try:
            request = parse_request(job)
            job_id = request.id
            journal.bind(request.id, request.type)
            family = self._family_for(request.type)
            plan = family.plan(request)
            journal.stage("planned", family=family.name)
            progress = Progress(job, self._progress_sender, self.settings.progress_interval_s)
            generation = family.generate(plan, progress)
            journal.stage("generated", assets=len(generation.assets), mode=generation.reference_mode)
            assets = self._store(request, generation, journal)
        except JobError as err:
            message = redact(str(err))
            journal.stage("failed", logging.WARNING, error=message)
            return failed(job_id, message)
        except Exception as err:
            return self._unexpected(job_id, err, journal)
        elapsed = journal.stage("completed", assets=len(assets))
        return completed(
            request.id,
            assets,
            generation_time=elapsed,
            job_type=request.type,
            reference_mode=generation.reference_mode,
        )

    def _store(self, request: JobRequest, generation: Generation, journal: JobLog) -> list[dict[str, Any]]:
        """Store every asset, or none: a partly stored job removes what it stored."""
        objects = JobObjects(self.storage)
        try:
            assets = store_generation(objects, request.user_id, request.id, generation)
        except Exception as err:
            left = objects.remove_all()
            log.exception("job %s: storing assets failed; could not remove %s", request.id, left or "nothing")
            raise JobError("storage", f"could not store the assets: {type(err).__name__}: {err}") from None
        journal.stage("stored", objects=len(objects.keys))
        return assets

    def _unexpected(self, job_id: str | None, err: Exception, journal: JobLog) -> dict[str, Any]:
        """An error that is not the payload's fault; GPU faults ask RunPod for a fresh worker."""
        if is_gpu_fault(err):
            release_gpu_memory()
            message = redact(f"gpu: {describe_gpu_fault(err)}")
            journal.stage("failed", logging.ERROR, error=message, refresh_worker=True)
            return {**failed(job_id, message), "refresh_worker": True}
        log.error("job %s: unexpected error", job_id, exc_info=err)
        message = redact(f"generation: {type(err).__name__}: {err}")
        journal.stage("failed", logging.ERROR, error=message)
        return failed(job_id, message)

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


def _raw_field(job: Any, name: str) -> Any:
    """``job["input"][name]`` before validation, or None."""
    payload = job.get("input") if isinstance(job, dict) else None
    return payload.get(name) if isinstance(payload, dict) else None


def _raw_job_id(job: Any) -> str | None:
    """The job id to echo in an error before the payload is validated."""
    candidate = _raw_field(job, "id") or (job.get("id") if isinstance(job, dict) else None)
    return candidate if isinstance(candidate, str) else None


def start_worker(settings: Settings) -> Worker:
    """Build storage, load and warm the configured families: everything done once at start."""
    from src.acceleration import configure_cuda_allocator
    from src.families import load_families

    configure_cuda_allocator()
    storage = build_storage(settings)
    families = load_families(settings)
    return Worker(settings, storage, families, runpod_sender())
