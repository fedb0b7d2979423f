"""The worker: payload -> validated job -> family plan -> generation -> storage -> callback."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import Any

from src.acceleration import configure_cuda_allocator
from src.background import BackgroundCompiler
from src.callback import completed, failed
from src.contract import JobError, JobRequest, one_line, parse_request, unknown_keys
from src.families import Family, ModelFamily, all_job_types, load_families, ready_order
from src.faults import describe_gpu_fault, is_gpu_fault, release_gpu_memory
from src.job_lock import JobLock
from src.joblog import JobLog, preview, redact
from src.late_families import FamilyUnavailableError, LateFamilies
from src.media.assets import Generation, store_generation
from src.media.storage import JobObjects, Storage, build_storage, is_outage
from src.prefetch import WeightPrefetch
from src.progress import Progress, Sender, runpod_sender
from src.prompt.enhance import ENHANCED_TYPES, Enhancement, enhance, wants_enhancement
from src.settings import Settings

log = logging.getLogger(__name__)


class Worker:
    """Holds the loaded model families and the storage backend; runs one job at a time.

    ``startup``: the start-up record (seconds per phase, what each fast path does); ``job_lock``:
    held during each job (packages compiled in the background are switched to, and families loaded
    behind the ready worker warmed up, between jobs); ``late``: those families' loader.
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        families: list[Family],
        progress_sender: Sender | None = None,
        startup: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.families = families
        self.startup = startup or {}
        self._progress_sender = progress_sender
        self._by_type: dict[str, ModelFamily] = {}
        self._llm: Family | None = None
        for family in families:
            self._index(family)
        self.job_lock = JobLock()
        self.ready_at = time.perf_counter()  # what the start-up record's "after ready" times count from
        self.background: BackgroundCompiler | None = None
        self.late: LateFamilies | None = None

    def _index(self, family: Family) -> None:
        self._by_type.update(dict.fromkeys(family.job_types, family))  # type: ignore[arg-type]
        if family.name == "prompt":
            self._llm = family

    def add_family(self, family: Family) -> None:
        """A family loaded behind the ready worker (called between jobs, under the job lock)."""
        self.families.append(family)
        self._index(family)

    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one RunPod job and return the callback dict (or a failed one). Never raises.

        A job for a family still loading behind the ready worker waits for it first, outside the
        job lock (that family's warm-up takes it)."""
        if self.late is not None:
            self.late.wait_until(lambda: self._servable(job))
        with self.job_lock:
            return self._handle(job)

    def _servable(self, job: Any) -> bool:
        """Whether the families ``job`` names (its type, and the LLM when it asks for enhancement)
        are loaded; True for a type no family has (validation refuses it)."""
        job_type = _raw_field(job, "type")
        if not isinstance(job_type, str):
            return True
        wants_llm = wants_enhancement(job_type, _raw_field(job, "config"))
        return ENHANCED_TYPES.get(job_type, job_type) in self._by_type and (
            not wants_llm or self._llm is not None
        )

    def _handle(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id = _raw_job_id(job)
        job_log = JobLog(job_id, _raw_field(job, "type"))
        job_log.stage("received", prompt=preview(_raw_field(job, "prompt")))
        try:
            request = parse_request(job)
            job_id = request.id
            job_log.bind(request.id, request.type)
            base_type = ENHANCED_TYPES.get(request.type)
            if base_type is not None:
                self._needs_llm("type", repr(request.type))
            family = self._family_for(base_type or request.type)
            unknown = self._unknown_keys(job, family, job_log)
            plan = self._plan(family, request.model_copy(update={"type": base_type or request.type}), unknown)
            job_log.stage("planned", family=family.name)
            enhancement = None
            if wants_enhancement(request.type, request.config):  # config.enhance_prompt: a bool, planned
                enhancement = self._enhance(family, plan.prompt, job_log)
                plan = dataclasses.replace(plan, prompt=enhancement.prompt)
            progress = Progress(job, self._progress_sender, self.settings.progress_interval_s)
            compiled_before = family.fast_paths.compiled_calls()
            generation = family.generate(plan, progress)
            compiled = family.fast_paths.compiled_calls() > compiled_before
            job_log.stage("generated", assets=len(generation.assets), mode=generation.reference_mode)
            assets = self._store(request, generation, job_log, enhancement, compiled)
        except JobError as err:
            message = redact(str(err))
            job_log.stage("failed", logging.WARNING, error=message)
            return failed(job_id, message)
        except FamilyUnavailableError as err:  # the worker's fault: RunPod replaces it
            message = redact(str(err))
            job_log.stage("failed", logging.ERROR, error=message, refresh_worker=True)
            return {**failed(job_id, message), "refresh_worker": True}
        except Exception as err:
            return self._unexpected(job_id, err, job_log)
        elapsed = job_log.stage("completed", assets=len(assets))
        return completed(
            request.id,
            assets,
            generation_time=elapsed,
            job_type=request.type,
            reference_mode=generation.reference_mode,
            ignored_keys=[err.field for err in unknown],
            enhancement=enhancement.job_metadata() if enhancement else None,
        )

    def _needs_llm(self, field: str, what: str) -> Family:
        """The prompt family, or a JobError naming ``field`` when this worker does not load it."""
        self._check_loaded("prompt")
        if self._llm is None:
            loaded = ",".join(self.settings.worker_models)
            raise JobError(
                field,
                f"{what} needs a model family this worker does not load (prompt; WORKER_MODELS={loaded})",
            )
        return self._llm

    def _enhance(self, family: ModelFamily, prompt: str, job_log: JobLog) -> Enhancement:
        """The job's prompt rewritten by the prompt family's LLM (or kept, saying why)."""
        llm = self._needs_llm("config.enhance_prompt", "true")
        enhancement = enhance(llm, family.name, prompt)  # type: ignore[arg-type]
        job_log.stage(
            "enhanced",
            seconds=round(enhancement.seconds, 3),
            used=enhancement.enhanced is not None,
            prompt=preview(enhancement.prompt),
        )
        return enhancement

    def _unknown_keys(self, job: dict[str, Any], family: ModelFamily, job_log: JobLog) -> list[JobError]:
        """Payload keys nothing reads: refused with STRICT_PAYLOADS, else logged (and reported)."""
        unknown = unknown_keys(job, family.config_model)
        if unknown and self.settings.strict_payloads:
            raise unknown[0]
        if unknown:
            job_log.stage("ignored_keys", logging.WARNING, keys=[str(err) for err in unknown])
        return unknown

    @staticmethod
    def _plan(family: ModelFamily, request: JobRequest, unknown: list[JobError]) -> Any:
        """The family's plan; a refusal also names the unknown keys (a misspelt key is the likely cause)."""
        try:
            return family.plan(request)
        except JobError as err:
            if not unknown:
                raise
            raise JobError(err.field, f"{err.reason} ({'; '.join(map(str, unknown))})") from None

    def _store(
        self,
        request: JobRequest,
        generation: Generation,
        job_log: JobLog,
        enhancement: Enhancement | None,
        compiled: bool,
    ) -> list[dict[str, Any]]:
        """Store every asset, or none: a partly stored job removes what it stored.

        Each asset's metadata also says whether the prompt was enhanced and whether compiled
        packages served the job (``compiled``)."""
        objects = JobObjects(self.storage)
        job_metadata = {
            "prompt_enhanced": enhancement is not None and enhancement.enhanced is not None,
            "compiled": compiled,
        }
        try:
            assets = store_generation(objects, request.user_id, request.id, generation, job_metadata)
        except Exception as err:
            if not is_outage(err):  # a bug, not the service: its traceback helps
                log.error("job %s: storing assets failed", request.id, exc_info=err)
            left = objects.remove_all()
            reason = f"could not store the assets: {one_line(err)}"
            if left:
                reason += f"; {len(left)} stored objects could not be removed: {', '.join(left)}"
            raise JobError("storage", reason) from None
        job_log.stage("stored", objects=len(objects.keys))
        return assets

    def _unexpected(self, job_id: str | None, err: Exception, job_log: JobLog) -> dict[str, Any]:
        """An error that is not the payload's fault; GPU faults ask RunPod for a fresh worker."""
        if is_gpu_fault(err):
            release_gpu_memory()
            message = redact(f"gpu: {describe_gpu_fault(err)}")
            job_log.stage("failed", logging.ERROR, error=message, refresh_worker=True)
            return {**failed(job_id, message), "refresh_worker": True}
        log.error("job %s: unexpected error", job_id, exc_info=err)
        message = redact(f"generation: {type(err).__name__}: {err}")
        job_log.stage("failed", logging.ERROR, error=message)
        return failed(job_id, message)

    def _family_for(self, job_type: str) -> ModelFamily:
        family = self._by_type.get(job_type)
        if family is not None:
            return family
        known = {**all_job_types(), **dict.fromkeys(ENHANCED_TYPES, "prompt")}
        self._check_loaded(known.get(job_type))
        if job_type in known:
            loaded = ",".join(self.settings.worker_models)
            raise JobError(
                "type",
                f"{job_type!r} needs a model family this worker does not load (WORKER_MODELS={loaded})",
            )
        raise JobError("type", f"unknown job type {job_type!r}; expected one of: {', '.join(sorted(known))}")

    def _check_loaded(self, name: str | None) -> None:
        """Raise FamilyUnavailableError when family ``name`` failed to load behind the ready worker."""
        if self.late is not None and name in self.late.failed:
            raise FamilyUnavailableError(name, self.late.failed[name])


def _raw_field(job: Any, name: str) -> Any:
    """``job["input"][name]`` before validation, or None."""
    payload = job.get("input") if isinstance(job, dict) else None
    return payload.get(name) if isinstance(payload, dict) else None


def _raw_job_id(job: Any) -> str | None:
    """The job id to echo in an error before the payload is validated."""
    candidate = _raw_field(job, "id") or (job.get("id") if isinstance(job, dict) else None)
    return candidate if isinstance(candidate, str) else None


def start_worker(settings: Settings) -> Worker:
    """Build storage, load and warm the families the worker is ready with (READY_AFTER), and start
    loading the others behind it: everything done once at start."""
    now, later = ready_order(settings)
    prefetch = WeightPrefetch.start_for(settings, now, later)  # their weights, read while they import
    configure_cuda_allocator()
    storage = build_storage(settings)
    if settings.compile != "off" and (problem := settings.compile_cache_problem()):
        log.warning(problem)
    families, startup = load_families(settings, now)
    startup.update(prefetch.record())
    # What start-up built lives as long as the worker: frozen, the cyclic garbage collector stops
    # rescanning it (a full pass took 0.35 s on the tiny models), so it collects each job's cycles
    # (Compel's prompt parser leaves ~2 MB of them) promptly, in milliseconds.
    gc.collect()
    gc.freeze()
    worker = Worker(settings, storage, families, runpod_sender(), startup)
    if later:
        worker.late = LateFamilies(
            settings,
            later,
            worker.job_lock,
            startup,
            worker.add_family,
            lambda: _compile_missing(worker),
            worker.ready_at,
        )
        worker.late.start()
    else:
        _compile_missing(worker)
    return worker


def _compile_missing(worker: Worker) -> None:
    """Start the background compile of the families' missing packages, if any."""
    if any(family.fast_paths.missing for family in worker.families):
        worker.background = BackgroundCompiler(
            worker.settings,
            worker.families,
            worker.job_lock,
            worker.startup,
            worker.startup["resident_gib"],
            worker.ready_at,
        )
        worker.background.start()
